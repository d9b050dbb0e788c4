// torch side of the CUDA attention: checks, output allocation, the params struct, and the op
// registrations (fastformer::cuda_attention_fwd / cuda_attention_bwd; CUDA and Meta kernels).
//
// attn_mask is anything broadcastable to (B, Hq, Lq, Lk): bool (True = may attend) or additive
// float (read as float32); it is expanded as a view (stride 0 on broadcast dims), never
// materialised. key_padding_mask is bool (B, Lk), True = padding: read by the kernels as bytes,
// with each batch row's key end and whether it has padding before it found on the device by one
// small kernel (key_range.cu; no host synchronisation, see params.h). The dropout seed comes as a
// one-element int64 tensor on the device, which the kernels load (see op_utils.h). The backward
// writes a float mask's gradient into grad_attn_mask when given one (float32, zero-filled by the
// caller; fastformer/masks.py: mask_grad_buffer says which shape).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <tuple>

#include "attention/launch.h"
#include "attention/params.h"
#include "common/op_device.h"
#include "common/op_utils.h"

namespace fastformer {
namespace attention {
namespace {

constexpr const char* kOp = "fastformer attention (cuda): ";

struct Sizes {
  int64_t batch, heads_q, heads_k, len_q, len_k, dim, dim_v;
};

// What the kernels need of a (B, H, L, D) tensor's last dim: stride 1 (the strides of a dim of
// size 1, or of a tensor with no element, which PyTorch calls contiguous whatever they are, do not
// matter; autograd passes such empty gradients).
bool last_dim_contiguous(const at::Tensor& t) { return t.stride(3) == 1 || t.size(3) == 1 || t.numel() == 0; }

Sizes check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, kOp,
              "query, key and value must be 4-D (batch, heads, seq_len, head_dim), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kOp,
              "dtype must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kOp,
              "query, key and value must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  Sizes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.batch && v.size(0) == s.batch, kOp, "batch sizes differ: ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(v.size(1) == s.heads_k && v.size(2) == s.len_k, kOp, "key ", k.sizes(), " and value ", v.sizes(),
              " must agree on heads and seq_len");
  TORCH_CHECK(k.size(3) == s.dim, kOp, "query and key head dims differ: ", s.dim, " vs ", k.size(3));
  // (No heads at all is an empty call, as in fastformer.attention's own check.)
  TORCH_CHECK(s.heads_k > 0 ? s.heads_q % s.heads_k == 0 : s.heads_q == 0, kOp, "query heads (", s.heads_q,
              ") must be a multiple of key/value heads (", s.heads_k, ")");
  TORCH_CHECK(s.dim >= 1 && s.dim_v >= 1 && std::max(s.dim, s.dim_v) <= kMaxHeadDim, kOp,
              "head dims 1..", kMaxHeadDim, " supported, got ", s.dim, " and ", s.dim_v);
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(last_dim_contiguous(*t), kOp,
                "the last dim of query, key and value must be contiguous (stride 1), got strides ", t->strides());
  }
  TORCH_CHECK(s.len_q <= std::numeric_limits<int>::max() && s.len_k <= std::numeric_limits<int>::max(), kOp,
              "sequence lengths must fit in int32");
  // Every launch puts its CTAs on gridDim.x (flat_grid_ctas; the preprocess kPreprocessRowsPerCta rows each).
  const int64_t rows = s.batch * s.heads_q * s.len_q;
  const int64_t ctas = std::max({flat_grid_ctas(s.len_q, kMinRowsPerCta, s.heads_q, s.batch),
                                 flat_grid_ctas(s.len_k, kMinRowsPerCta, s.heads_k, s.batch),
                                 (rows + kPreprocessRowsPerCta - 1) / kPreprocessRowsPerCta});
  TORCH_CHECK(ctas <= std::numeric_limits<int>::max(), kOp, "batch ", s.batch, " x heads ", s.heads_q,
              " x sequence lengths ", s.len_q, ", ", s.len_k, " need ", ctas,
              " CTAs, more than a grid holds (2^31 - 1)");
  return s;
}

// A 2-byte-element tensor whose rows (all of them, at every batch/head) start at multiples of
// `bytes`.
bool rows_aligned(const at::Tensor& t, int64_t bytes) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && (t.stride(d) * 2) % bytes != 0) return false;
  }
  return true;
}

// AttentionParams::load_bytes for tiles read from all of `tensors`: the widest alignment they share.
int load_bytes(std::initializer_list<const at::Tensor*> tensors) {
  for (int bytes : {16, 4}) {
    bool all = true;
    for (const at::Tensor* t : tensors) all = all && rows_aligned(*t, bytes);
    if (all) return bytes;
  }
  return 0;
}

// Every two adjacent elements (cols 2t, 2t + 1) start at a boundary of their size together.
bool pairs_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % (2 * t.element_size()) != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 2 != 0) return false;
  }
  return true;
}

void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), kOp, name, " is on ", t.device(), " but query is on ", ref.device());
}

// The device tensors behind the key-padding params (kept alive by the caller until the launch).
struct KeyPadding {
  at::Tensor bytes;   // (B, Lk) uint8, nonzero = padding, unit key stride
  at::Tensor ranges;  // (2, B) int32: key ends, then holes (params.h), made by the key-range kernel
};

void check_key_padding_mask(const c10::optional<at::Tensor>& key_padding_mask, const Sizes& s) {
  if (!key_padding_mask.has_value() || !key_padding_mask->defined()) return;
  const at::Tensor& mask = *key_padding_mask;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == s.batch &&
                  mask.size(1) == s.len_k,
              kOp, "key_padding_mask must be a bool tensor of shape (B, Lk) = (", s.batch, ", ", s.len_k, "), got ",
              mask.scalar_type(), " ", mask.sizes());
}

// The key-padding params: the mask's bytes, and each batch row's key end and holes, which the
// key-range kernel launched here writes (ends, then holes, in one int32 (2, B) tensor).
KeyPadding prepare_key_padding(const at::Tensor& mask, AttentionParams& p) {
  KeyPadding padding;
  padding.bytes = mask.view(at::kByte);
  if (padding.bytes.stride(1) != 1) padding.bytes = padding.bytes.contiguous();
  padding.ranges = at::empty({2, mask.size(0)}, mask.options().dtype(at::kInt));
  KeyRangeParams range{};
  range.key_padding = padding.bytes.data_ptr<uint8_t>();
  range.key_padding_batch_stride = padding.bytes.stride(0);
  range.batch = static_cast<int>(mask.size(0));
  range.len_k = static_cast<int>(mask.size(1));
  range.key_ends = padding.ranges.data_ptr<int32_t>();
  range.key_padding_holes = range.key_ends + range.batch;
  launch_attention_key_range(range, kernel_stream());
  p.key_padding = range.key_padding;
  p.key_padding_batch_stride = range.key_padding_batch_stride;
  p.key_ends = range.key_ends;
  p.key_padding_holes = range.key_padding_holes;
  return padding;
}

// An empty (B, H, L, last_dim) tensor for the output or a gradient of attention input t (B, H, L, D),
// laid out as the Triton backend lays them out too (fastformer/library.py: attention_layout_like):
// dense, the batch, head and sequence dims nested as in t's memory (largest stride outermost, ties in
// dim order), the last dim innermost. Then an output laid out like q merges its heads for the output
// projection with a free view, and the gradients of q, k, v split from a projection flow back through
// the views without a copy. The kernels take any row strides.
at::Tensor layout_like(const at::Tensor& t, int64_t last_dim) {
  std::array<int64_t, 3> outer{0, 1, 2};
  std::stable_sort(outer.begin(), outer.end(), [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  std::array<int64_t, 4> strides{0, 0, 0, 1};
  int64_t step = last_dim;
  for (int i = 2; i >= 0; --i) {
    strides[outer[i]] = step;
    step *= std::max<int64_t>(t.size(outer[i]), 1);  // as PyTorch's contiguous strides
  }
  return at::empty_strided({t.size(0), t.size(1), t.size(2), last_dim}, strides, t.options());
}

at::Tensor gradient_like(const at::Tensor& t) { return layout_like(t, t.size(3)); }

// The forward's output (B, Hq, Lq, Dv): laid out like q (eager mode), or stored as (B, Lq, Hq, Dv),
// the fixed layout of the library's custom op (whose fake kernel cannot follow q's runtime strides).
at::Tensor output_like(const at::Tensor& q, const Sizes& s, bool out_like_query) {
  if (out_like_query) return layout_like(q, s.dim_v);
  return at::empty({s.batch, s.len_q, s.heads_q, s.dim_v}, q.options()).transpose(1, 2);
}

// Fill everything shared by the forward and backward params. Keeps the device tensors the params
// point to (mask, key padding) alive in *mask_holder and *padding_holder.
void fill_common(AttentionParams& p, const Sizes& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
                 double scale, bool is_causal, double dropout_p, const c10::optional<at::Tensor>& seed,
                 at::Tensor* mask_holder, KeyPadding* padding_holder) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);

  p.mask = nullptr;
  p.mask_kind = kNoMask;
  p.mask_batch_stride = p.mask_head_stride = p.mask_row_stride = p.mask_col_stride = 0;
  if (attn_mask.has_value() && attn_mask->defined()) {
    at::Tensor mask = *attn_mask;
    check_same_device(q, mask, "attn_mask");
    TORCH_CHECK(mask.dim() <= 4, kOp, "attn_mask must have at most 4 dims, got ", mask.sizes());
    const int64_t target[4] = {s.batch, s.heads_q, s.len_q, s.len_k};
    for (int64_t d = 0; d < mask.dim(); ++d) {
      const int64_t size = mask.size(mask.dim() - 1 - d), want = target[3 - d];
      TORCH_CHECK(size == 1 || size == want, kOp, "attn_mask of shape ", mask.sizes(),
                  " does not broadcast to (B, Hq, Lq, Lk) = (", s.batch, ", ", s.heads_q, ", ", s.len_q, ", ",
                  s.len_k, ")");
    }
    // Broadcast dims of an expanded view (stride 0, e.g. a padding mask expanded over the queries)
    // back to size 1, so that the dtype change below converts only the stored elements.
    for (int64_t d = 0; d < mask.dim(); ++d) {
      if (mask.stride(d) == 0 && mask.size(d) > 1) mask = mask.narrow(d, 0, 1);
    }
    if (mask.scalar_type() == at::kBool) {
      mask = mask.view(at::kByte);
      p.mask_kind = kBoolMask;
    } else {
      TORCH_CHECK(at::isFloatingType(mask.scalar_type()), kOp, "attn_mask must be bool or floating point, got ",
                  mask.scalar_type());
      // Rounded to the query dtype first, as the other backends see it, then read as float32.
      // fastformer.attention hands a wider mask over already saturated to the query dtype's range
      // (masks.float_mask_in), so finite values stay finite.
      mask = mask.to(q.scalar_type()).to(at::kFloat);
      p.mask_kind = kFloatMask;
    }
    mask = mask.expand({s.batch, s.heads_q, s.len_q, s.len_k});
    *mask_holder = mask;
    p.mask = mask.data_ptr();
    p.mask_batch_stride = mask.stride(0), p.mask_head_stride = mask.stride(1);
    p.mask_row_stride = mask.stride(2), p.mask_col_stride = mask.stride(3);
  }
  p.key_ends = nullptr;
  p.key_padding_holes = nullptr;
  p.key_padding = nullptr;
  p.key_padding_batch_stride = 0;
  check_key_padding_mask(key_padding_mask, s);
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    check_same_device(q, *key_padding_mask, "key_padding_mask");
    *padding_holder = prepare_key_padding(*key_padding_mask, p);
  }

  p.batch = static_cast<int>(s.batch);
  p.heads_q = static_cast<int>(s.heads_q);
  p.heads_k = static_cast<int>(s.heads_k);
  p.group = static_cast<int>(s.heads_q / s.heads_k);
  p.len_q = static_cast<int>(s.len_q);
  p.len_k = static_cast<int>(s.len_k);
  p.dim = static_cast<int>(s.dim);
  p.dim_v = static_cast<int>(s.dim_v);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.is_causal = is_causal;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kOp, "dropout_p must be in [0, 1), got ", dropout_p);
  p.has_dropout = dropout_p > 0.0;
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_scale = p.has_dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  p.seed = seed_pointer(seed, p.has_dropout, q.device(), "fastformer attention (cuda)");
  p.load_bytes = load_bytes({&q, &k, &v});
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const c10::optional<at::Tensor>& attn_mask,
                                                      const c10::optional<at::Tensor>& key_padding_mask,
                                                      double scale, bool is_causal, double dropout_p,
                                                      const c10::optional<at::Tensor>& seed, bool out_like_query) {
  const Sizes s = check_inputs(q, k, v);
  TORCH_CHECK(on_kernel_device(q), kOp, "query must be a CUDA tensor");
  check_same_device(q, k, "key");
  check_same_device(q, v, "value");
  const KernelDeviceGuard guard(q.device());
  at::Tensor out = output_like(q, s, out_like_query);
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.len_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || s.len_k == 0) {  // nothing to attend to
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  AttentionParams p{};
  at::Tensor mask;
  KeyPadding padding;
  fill_common(p, s, q, k, v, attn_mask, key_padding_mask, scale, is_causal, dropout_p, seed, &mask, &padding);
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1), p.o_row_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.pair_stores = pairs_aligned(out);
  launch_attention_fwd(p, padded_head_dim(std::max(p.dim, p.dim_v)), q.scalar_type() == at::kBFloat16,
                       kernel_stream());
  FASTFORMER_CHECK_LAUNCH();
  return {out, lse};
}

// Checks grad_attn_mask (float32, 4-D, each dim the scores' size or 1, on q's device, and a float
// attn_mask to go with it) and returns whether the kernel must add into it with atomics: where it
// broadcasts over a dim of size > 1.
bool check_grad_attn_mask(const at::Tensor& grad, const c10::optional<at::Tensor>& attn_mask, const Sizes& s,
                          const at::Tensor& q) {
  TORCH_CHECK(attn_mask.has_value() && attn_mask->defined() && at::isFloatingType(attn_mask->scalar_type()), kOp,
              "grad_attn_mask is the gradient of a float attn_mask, and attn_mask is ",
              attn_mask.has_value() && attn_mask->defined() ? c10::toString(attn_mask->scalar_type()) : "None");
  check_same_device(q, grad, "grad_attn_mask");
  const int64_t target[4] = {s.batch, s.heads_q, s.len_q, s.len_k};
  bool broadcast = false;
  bool shape_ok = grad.dim() == 4 && grad.scalar_type() == at::kFloat;
  for (int64_t d = 0; shape_ok && d < 4; ++d) {
    shape_ok = grad.size(d) == target[d] || grad.size(d) == 1;
    broadcast = broadcast || (grad.size(d) == 1 && target[d] > 1);
  }
  TORCH_CHECK(shape_ok, kOp, "grad_attn_mask must be a float32 tensor of 4 dims, each 1 or that of (B, Hq, Lq, Lk) = (",
              s.batch, ", ", s.heads_q, ", ", s.len_q, ", ", s.len_k, "), got ", grad.scalar_type(), " ",
              grad.sizes());
  return broadcast;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, double scale, bool is_causal, double dropout_p,
    const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& grad_attn_mask) {
  const Sizes s = check_inputs(q, k, v);
  TORCH_CHECK(on_kernel_device(q), kOp, "query must be a CUDA tensor");
  for (const at::Tensor* t : {&k, &v, &grad_out, &out, &lse}) check_same_device(q, *t, "an input");
  const std::vector<int64_t> out_shape{s.batch, s.heads_q, s.len_q, s.dim_v};
  TORCH_CHECK(grad_out.sizes() == out_shape && out.sizes() == out_shape, kOp, "grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " must have shape ", at::IntArrayRef(out_shape));
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), kOp,
              "grad_out and out must have the query's dtype");
  TORCH_CHECK(last_dim_contiguous(grad_out), kOp, "grad_out's last dim must be contiguous");
  TORCH_CHECK(last_dim_contiguous(out), kOp, "out's last dim must be contiguous");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({s.batch, s.heads_q, s.len_q}),
              kOp, "lse must be a contiguous float32 tensor of shape (B, Hq, Lq), got ", lse.sizes());
  const bool mask_grad = grad_attn_mask.has_value() && grad_attn_mask->defined();
  const bool mask_grad_atomic = mask_grad && check_grad_attn_mask(*grad_attn_mask, attn_mask, s, q);
  if (mask_grad_atomic) {
    at::globalContext().alertNotDeterministic(
        "fastformer attention (cuda) backward into a broadcast grad_attn_mask (float32 atomic adds); "
        "pass one of the full (B, Hq, Lq, Lk) shape and sum it instead");
  }
  const KernelDeviceGuard guard(q.device());
  at::Tensor grad_q = gradient_like(q);
  at::Tensor grad_k = gradient_like(k);
  at::Tensor grad_v = gradient_like(v);
  if (s.batch * s.heads_q * s.len_q == 0 || s.len_k == 0) {
    grad_q.zero_(), grad_k.zero_(), grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  AttentionBwdParams p{};
  at::Tensor mask;
  KeyPadding padding;
  fill_common(p, s, q, k, v, attn_mask, key_padding_mask, scale, is_causal, dropout_p, seed, &mask, &padding);
  p.load_bytes = load_bytes({&q, &k, &v, &grad_out});
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1), p.o_row_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.grad_out = grad_out.data_ptr();
  p.do_batch_stride = grad_out.stride(0), p.do_head_stride = grad_out.stride(1);
  p.do_row_stride = grad_out.stride(2);
  at::Tensor delta = at::empty({s.batch, s.heads_q, s.len_q}, q.options().dtype(at::kFloat));
  p.delta = delta.data_ptr<float>();
  p.grad_q = grad_q.data_ptr();
  p.dq_batch_stride = grad_q.stride(0), p.dq_head_stride = grad_q.stride(1), p.dq_row_stride = grad_q.stride(2);
  p.grad_k = grad_k.data_ptr();
  p.dk_batch_stride = grad_k.stride(0), p.dk_head_stride = grad_k.stride(1), p.dk_row_stride = grad_k.stride(2);
  p.grad_v = grad_v.data_ptr();
  p.dv_batch_stride = grad_v.stride(0), p.dv_head_stride = grad_v.stride(1), p.dv_row_stride = grad_v.stride(2);
  p.pair_stores = pairs_aligned(grad_q) && pairs_aligned(grad_k) && pairs_aligned(grad_v);
  // dQ from float32 atomic adds in the dK/dV kernel (FlashAttention-2's default: five products a
  // score instead of seven), unless PyTorch is asked for deterministic algorithms: then the dQ
  // kernel. The sums are laid out like grad_q, so that the cast into it is one elementwise copy;
  // the preprocess kernel zeroes them.
  at::Tensor grad_q_sum;
  if (!at::globalContext().deterministicAlgorithms()) {
    grad_q_sum = at::empty_strided(grad_q.sizes(), grad_q.strides(), grad_q.options().dtype(at::kFloat));
    p.grad_q_sum = grad_q_sum.data_ptr<float>();
    p.dqs_batch_stride = grad_q_sum.stride(0), p.dqs_head_stride = grad_q_sum.stride(1);
    p.dqs_row_stride = grad_q_sum.stride(2);
    p.pair_atomics = pairs_aligned(grad_q_sum);
  }
  // The mask's gradient: zero-filled by the caller (the kernel skips tiles: causal, padding),
  // read through stride 0 on the dims it broadcasts.
  if (mask_grad) {
    const at::Tensor& grad = *grad_attn_mask;
    p.grad_mask = grad.data_ptr<float>();
    int64_t* strides[4] = {&p.dm_batch_stride, &p.dm_head_stride, &p.dm_row_stride, &p.dm_col_stride};
    for (int d = 0; d < 4; ++d) *strides[d] = grad.size(d) == 1 ? 0 : grad.stride(d);
    p.grad_mask_atomic = mask_grad_atomic;
  }
  launch_attention_bwd(p, padded_head_dim(std::max(p.dim, p.dim_v)), q.scalar_type() == at::kBFloat16,
                       kernel_stream());
  FASTFORMER_CHECK_LAUNCH();  // any of the launches
  if (grad_q_sum.defined()) grad_q.copy_(grad_q_sum);
  return {grad_q, grad_k, grad_v};
}

// Meta (fake) kernels: the shapes, dtypes and strides of the CUDA kernels' outputs.
std::tuple<at::Tensor, at::Tensor> attention_fwd_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const c10::optional<at::Tensor>&,
                                                      const c10::optional<at::Tensor>& key_padding_mask, double,
                                                      bool, double, const c10::optional<at::Tensor>&,
                                                      bool out_like_query) {
  const Sizes s = check_inputs(q, k, v);
  check_key_padding_mask(key_padding_mask, s);
  at::Tensor out = output_like(q, s, out_like_query);
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.len_q}, q.options().dtype(at::kFloat));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_meta(
    const at::Tensor&, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor&,
    const at::Tensor&, const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
    double, bool, double, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>& grad_attn_mask) {
  const Sizes s = check_inputs(q, k, v);
  check_key_padding_mask(key_padding_mask, s);
  if (grad_attn_mask.has_value() && grad_attn_mask->defined()) check_grad_attn_mask(*grad_attn_mask, attn_mask, s, q);
  return {gradient_like(q), gradient_like(k), gradient_like(v)};
}

}  // namespace
}  // namespace attention
}  // namespace fastformer

// The namespace also holds ops defined from Python (fastformer/library.py): a fragment, never
// TORCH_LIBRARY.
TORCH_LIBRARY_FRAGMENT(FASTFORMER_OPS_NAMESPACE, m) {
  m.def(
      "cuda_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor? key_padding_mask, float scale, bool is_causal, float dropout_p, Tensor? seed, "
      "bool out_like_query=True) -> (Tensor out, Tensor lse)");
  m.def(
      "cuda_attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
      "Tensor? attn_mask, Tensor? key_padding_mask, float scale, bool is_causal, float dropout_p, Tensor? seed, "
      "Tensor(a!)? grad_attn_mask=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}

TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE, FASTFORMER_KERNEL_DISPATCH_KEY, m) {
  m.impl("cuda_attention_fwd", &fastformer::attention::attention_fwd_cuda);
  m.impl("cuda_attention_bwd", &fastformer::attention::attention_bwd_cuda);
}

TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE, Meta, m) {
  m.impl("cuda_attention_fwd", &fastformer::attention::attention_fwd_meta);
  m.impl("cuda_attention_bwd", &fastformer::attention::attention_bwd_meta);
}

// Run-time switches made compile-time ones: how a launcher picks the kernel instantiation for a
// call without spelling out every combination of its switches.
#pragma once

#include <type_traits>

namespace fastformer {

// with_flags(f, a, b, ...) calls f(std::bool_constant<a>{}, std::bool_constant<b>{}, ...). Each
// flag reaches f as a value of its own type, which converts to its bool in constant expressions:
// a template argument (Traits<T, vectorized, ...>) or an `if constexpr` condition. Every
// combination of the flags is instantiated.
template <typename F>
void with_flags(F&& f) {
  f();
}

template <typename F, typename... Rest>
void with_flags(F&& f, bool flag, Rest... rest) {
  static_assert((std::is_same_v<Rest, bool> && ...), "with_flags takes bools");
  auto bind = [&](auto constant) {
    with_flags([&](auto... constants) { f(constant, constants...); }, rest...);
  };
  if (flag) {
    bind(std::true_type{});
  } else {
    bind(std::false_type{});
  }
}

}  // namespace fastformer

// NonNull<T>: a borrowed pointer that is never null (checked once, where it is made).
#pragma once

#include <cstdlib>

namespace dsd {

template <class T>
class NonNull {
 public:
  explicit NonNull(T* p) : p_(p) {
    if (p_ == nullptr) std::abort();
  }
  NonNull(T& r) : p_(&r) {}  // NOLINT: a reference is never null
  T* get() const { return p_; }
  T& operator*() const { return *p_; }
  T* operator->() const { return p_; }

 private:
  T* p_;
};

}  // namespace dsd

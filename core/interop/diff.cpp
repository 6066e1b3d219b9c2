#include "core/interop/diff.h"

#include <fmt/ranges.h>

#include <complex>
#include <cstring>
#include <mutex>
#include <map>
#include <unordered_map>

#include "core/base/make_error.h"
#include "core/base/strings.h"
#include "core/base/torch_call.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::interop {
namespace {

std::string kind_str(Entry::Kind k) { return k == Entry::Kind::kTensor ? "a tensor" : "a value"; }

// Element `index` of a contiguous tensor, printed.
std::string element_str(const at::Tensor& t, int64_t index) {
  auto r = torch_call(Code::kInternal, "printing an element", [&]() -> std::string {
    const c10::Scalar s = t.reshape({-1})[index].item();
    if (t.is_complex()) {
      const auto c = s.toComplexDouble();
      return fmt::format("({}{:+}j)", c.real(), c.imag());
    }
    if (t.scalar_type() == at::kBool) return s.toBool() ? "True" : "False";
    if (t.is_floating_point()) return fmt::format("{}", s.toDouble());
    if (t.scalar_type() == at::kUInt64) return fmt::format("{}", s.to<uint64_t>());
    return fmt::format("{}", s.toLong());
  });
  return r.ok() ? *r : "?";
}

std::string index_str(const std::vector<int64_t>& shape, int64_t flat) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    idx[d] = shape[d] > 0 ? flat % shape[d] : 0;
    flat = shape[d] > 0 ? flat / shape[d] : 0;
  }
  return shape_str(idx);
}

// The first element at which two tensors of the same dtype and shape differ bitwise.
Result<std::optional<std::string>> first_difference(const at::Tensor& a0, const at::Tensor& b0,
                                                    const ItemInfo& it) {
  const at::Tensor a = TRY(torch_call(Code::kInternal, "comparing", [&] { return a0.cpu().contiguous(); }));
  const at::Tensor b = TRY(torch_call(Code::kInternal, "comparing", [&] { return b0.cpu().contiguous(); }));
  const auto* pa = static_cast<const unsigned char*>(a.const_data_ptr());
  const auto* pb = static_cast<const unsigned char*>(b.const_data_ptr());
  const uint64_t n = it.nbytes;
  if (n == 0 || std::memcmp(pa, pb, n) == 0) return std::optional<std::string>();
  uint64_t off = 0;
  constexpr uint64_t kStep = 1 << 16;
  while (off + kStep <= n && std::memcmp(pa + off, pb + off, kStep) == 0) off += kStep;
  while (pa[off] == pb[off]) ++off;
  const int64_t elem = static_cast<int64_t>(off / element_size(it.dtype));
  return std::optional(fmt::format("first difference at {}: {} vs {}", index_str(it.shape, elem), element_str(a, elem),
                                   element_str(b, elem)));
}

}  // namespace

Result<DiffReport> diff(const StateReader& a, const StateReader& b, const ProgressFn& progress) {
  DiffReport out;
  std::unordered_map<std::string_view, size_t> in_b;
  for (size_t i = 0; i < b.items().size(); ++i) in_b.emplace(b.items()[i].key, i);
  std::unordered_map<std::string_view, size_t> in_a;
  uint64_t total = 0;
  for (size_t i = 0; i < a.items().size(); ++i) {
    in_a.emplace(a.items()[i].key, i);
    if (in_b.count(a.items()[i].key)) total += a.items()[i].nbytes;
  }
  if (progress) progress(0, total);
  for (size_t i = 0; i < a.items().size(); ++i) {
    const ItemInfo& x = a.items()[i];
    auto it = in_b.find(x.key);
    if (it == in_b.end()) {
      out.only_in_a.push_back(x.key);
      continue;
    }
    const ItemInfo& y = b.items()[it->second];
    auto differ = [&](std::string what) { out.differences.emplace_back(x.key, std::move(what)); };
    if (x.kind != y.kind) {
      differ(fmt::format("{} in A, {} in B", kind_str(x.kind), kind_str(y.kind)));
      continue;
    }
    if (x.kind == Entry::Kind::kValue) {
      const Value va = TRY(a.read_value(i));
      const Value vb = TRY(b.read_value(it->second));
      std::string why;
      if (!deep_equal(va, vb, &why)) differ(fmt::format("values differ: {}", why));
      continue;
    }
    if (x.dtype != y.dtype) {
      differ(fmt::format("dtype {} vs {}", dtype_name(x.dtype), dtype_name(y.dtype)));
      continue;
    }
    if (x.shape != y.shape) {
      differ(fmt::format("shape {} vs {}", shape_str(x.shape), shape_str(y.shape)));
      continue;
    }
    const at::Tensor ta = TRY(a.read_tensor(i));
    const at::Tensor tb = TRY(b.read_tensor(it->second));
    if (auto d = TRY(first_difference(ta, tb, x))) differ(*d);
    out.compared_bytes += x.nbytes;
    if (progress) progress(out.compared_bytes, total);
  }
  for (const ItemInfo& y : b.items()) {
    if (!in_a.count(y.key)) out.only_in_b.push_back(y.key);
  }
  return out;
}

}  // namespace dsd::interop

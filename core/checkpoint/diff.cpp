// diff and verify_any: comparing two states of any formats, and checking one.
#include <fmt/ranges.h>

#include <complex>
#include <cstring>
#include <mutex>
#include <map>
#include <unordered_map>

#include "core/base/format.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/convert.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/formats/safetensors.h"
#include "core/formats/torch_save.h"
#include "core/formats/zip_check.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::checkpoint {
namespace {

std::string shape_str(const std::vector<int64_t>& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

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

Result<std::vector<Problem>> verify_any(const std::string& path, const ProgressFn& progress) {
  const Format f = TRY(detect_format(path));
  std::vector<Problem> problems;
  if (f == Format::kDsd || f == Format::kDcp) {
    for (VerifyProblem& p : TRY(verify(path, 0, progress))) problems.push_back({std::move(p.file), std::move(p.key), std::move(p.message)});
    return problems;
  }
  if (f == Format::kTorchSave) {
    // The pickle well formed, every record present, sized and in bounds (mapped, not read)...
    std::multimap<std::string, std::string> keys_of;  // record -> tensor paths
    TorchLoadOptions o;
    o.mmap = true;
    o.on_tensor = [&](const std::string& record, const std::string& where) { keys_of.emplace(record, where); };
    Result<Value> v = torch_load(TorchArchive::file(path), o);
    if (!v.ok()) {
      problems.push_back({path, v.error().context, v.error().message});
      return problems;
    }
    // ...and every record's CRC-32.
    auto records = check_zip(path);
    if (!records.ok()) {
      problems.push_back({path, "", records.error().message});
      return problems;
    }
    uint64_t total = 0;
    for (const ZipRecordCheck& r : *records) total += r.size;
    uint64_t done = 0;
    for (const ZipRecordCheck& r : *records) {
      done += r.size;
      if (progress) progress(done, total);
      if (r.crc_ok) continue;
      const size_t slash = r.name.find('/');
      const std::string record = slash == std::string::npos ? r.name : r.name.substr(slash + 1);
      std::string keys;
      for (auto [it, end] = keys_of.equal_range(record); it != end; ++it) keys += (keys.empty() ? "" : ", ") + it->second;
      problems.push_back({path, keys, fmt::format("CRC-32 mismatch in record '{}'{} of '{}'", r.name,
                                                  keys.empty() ? "" : fmt::format(" (tensor {})", keys), path)});
    }
    return problems;
  }
  // safetensors: headers, index and data bounds are checked on open; then every tensor is read.
  auto reader = StateReader::open(path);
  if (!reader.ok()) {
    const Error& e = reader.error();
    if (e.code == Code::kNotFound) return e;
    problems.push_back({e.context.empty() ? path : e.context, "", e.message});
    return problems;
  }
  uint64_t done = 0;
  for (size_t i = 0; i < (*reader)->items().size(); ++i) {
    const ItemInfo& it = (*reader)->items()[i];
    if (it.kind != Entry::Kind::kTensor) continue;
    auto t = (*reader)->read_tensor(i);
    if (!t.ok()) problems.push_back({it.chunks.empty() ? path : it.chunks[0].file, it.key, t.error().message});
    done += it.nbytes;
    if (progress) progress(done, (*reader)->tensor_bytes());
  }
  return problems;
}

}  // namespace dsd::checkpoint

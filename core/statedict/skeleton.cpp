#include "core/statedict/skeleton.h"

#include <ATen/ops/empty.h>
#include <nlohmann/json.hpp>

#include "core/base/json_limits.h"
#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/tensor/dtype_torch.h"

namespace dsd {
namespace {

using json = nlohmann::json;

// Containers are arrays led by a tag; scalars are themselves. A string, an int, a double, a
// bool, null and binary (bytes) are told apart by msgpack's own types.
Result<json> encode(const Value& v, std::vector<at::Tensor>* tensors, const std::string& path) {
  switch (v.kind()) {
    case Kind::kNone: return json(nullptr);
    case Kind::kBool: return json(*v.if_bool());
    case Kind::kInt: return json(*v.if_int());
    case Kind::kDouble: return json(*v.if_double());
    case Kind::kString: return json(*v.if_string());
    case Kind::kBytes: {
      const std::string& b = v.if_bytes()->data;
      return json::binary(std::vector<uint8_t>(b.begin(), b.end()));
    }
    case Kind::kTensor: {
      const TensorValue& t = *v.if_tensor();
      if (t.is_dist()) {
        return make_error_at(Code::kInvalidArgument, path,
                             "'{}' is a sharded tensor; broadcasting needs a full state dict on rank 0", path);
      }
      const DType dt = TRY(dtype_from_scalar_type(t.tensor.scalar_type()));
      json shape = json::array();
      for (int64_t s : t.tensor.sizes()) shape.push_back(s);
      const auto index = static_cast<int64_t>(tensors != nullptr ? tensors->size() : 0);
      if (tensors != nullptr) tensors->push_back(t.tensor);
      return json::array({"T", static_cast<int32_t>(dt), shape, index});
    }
    case Kind::kList: {
      const List& l = *v.if_list();
      json items = json::array();
      for (size_t i = 0; i < l.size(); ++i) items.push_back(TRY(encode(l[i], tensors, path + "." + std::to_string(i))));
      return json::array({l.is_tuple() ? "t" : "l", items});
    }
    case Kind::kDict: {
      const Dict& d = *v.if_dict();
      json items = json::array();
      for (const auto& e : d) {
        items.push_back(e.key);
        items.push_back(TRY(encode(e.value, tensors, path.empty() ? e.key : path + "." + e.key)));
      }
      return json::array({"d", d.int_keys(), items});
    }
  }
  return Error(Code::kInternal, "unknown value kind");
}

Error corrupt(std::string_view what) {
  return make_error(Code::kCorrupt, "malformed state-dict skeleton: {}", what);
}

constexpr int kMaxSkeletonDepth = 64;
// Each container is 2 msgpack levels (["l", [..]], ["d", b, [..]]), a tensor 2 (["T", c, [..]]).
constexpr int kMaxSkeletonMsgpackDepth = 2 * kMaxSkeletonDepth + 4;

Result<Value> decode(const json& j, std::vector<at::Tensor>* placeholders, int depth) {
  if (depth > kMaxSkeletonDepth) return corrupt("nested too deeply");
  if (j.is_null()) return Value();
  if (j.is_boolean()) return Value(j.get<bool>());
  if (j.is_number_integer()) return Value(j.get<int64_t>());
  if (j.is_number_float()) return Value(j.get<double>());
  if (j.is_string()) return Value(j.get<std::string>());
  if (j.is_binary()) {
    const auto& b = j.get_binary();
    return Value(Bytes{std::string(b.begin(), b.end())});
  }
  if (!j.is_array() || j.empty() || !j[0].is_string()) return corrupt("expected a tagged container");
  const std::string tag = j[0].get<std::string>();
  if (tag == "T") {
    if (j.size() != 4 || !j[1].is_number_integer() || !j[2].is_array()) return corrupt("bad tensor entry");
    auto dt = dtype_from_code(j[1].get<int32_t>());
    if (!dt) return corrupt("unknown dtype code");
    std::vector<int64_t> shape;
    for (const json& s : j[2]) {
      if (!s.is_number_integer() || s.get<int64_t>() < 0) return corrupt("bad tensor shape");
      shape.push_back(s.get<int64_t>());
    }
    at::Tensor t = TRY(torch_call(Code::kCorrupt, "making a placeholder tensor", [&] {
      return at::empty(shape, at::TensorOptions().dtype(to_scalar_type(*dt)).device(c10::DeviceType::Meta));
    }));
    if (placeholders != nullptr) placeholders->push_back(t);
    return Value(TensorValue{t, nullptr, false});
  }
  if (tag == "l" || tag == "t") {
    if (j.size() != 2 || !j[1].is_array()) return corrupt("bad list entry");
    auto l = List::make(tag == "t");
    for (const json& item : j[1]) l->push_back(TRY(decode(item, placeholders, depth + 1)));
    return Value(l);
  }
  if (tag == "d") {
    if (j.size() != 3 || !j[1].is_boolean() || !j[2].is_array() || j[2].size() % 2 != 0) return corrupt("bad dict entry");
    auto d = Dict::make();
    d->set_int_keys(j[1].get<bool>());
    for (size_t i = 0; i < j[2].size(); i += 2) {
      if (!j[2][i].is_string()) return corrupt("a dict key is not a string");
      if (d->contains(j[2][i].get_ref<const std::string&>())) return corrupt("a dict repeats a key");
      d->set(j[2][i].get<std::string>(), TRY(decode(j[2][i + 1], placeholders, depth + 1)));
    }
    return Value(d);
  }
  return corrupt("unknown container tag");
}

}  // namespace

Result<std::string> encode_skeleton(const Dict& root, std::vector<at::Tensor>* tensors) {
  DictPtr alias(DictPtr{}, const_cast<Dict*>(&root));
  json j = TRY(encode(Value(alias), tensors, ""));
  std::vector<uint8_t> bytes = json::to_msgpack(j);
  return std::string(bytes.begin(), bytes.end());
}

Result<RankZeroSkeleton> broadcast_skeleton(Communicator& comm, const Dict& root) {
  RankZeroSkeleton out;
  Result<std::string> encoded = comm.rank() == 0 ? encode_skeleton(root, &out.rank0_tensors) : std::string();
  TRY(agree(comm, encoded.ok() ? ok() : Status(encoded.error())));
  const std::string bytes = TRY(broadcast_bytes(comm, encoded.value(), 0));
  out.root = TRY(decode_skeleton(bytes, &out.placeholders));
  return out;
}

Result<DictPtr> decode_skeleton(std::string_view bytes, std::vector<at::Tensor>* placeholders) {
  // Checked before the tree exists: nlohmann's msgpack reader recurses once per level.
  auto parsed = parse_msgpack_strict(
      std::span(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), "the state-dict skeleton",
      kMaxSkeletonMsgpackDepth);
  if (!parsed.ok()) return corrupt(parsed.error().message);
  const json j = std::move(*parsed);
  Value v = TRY(decode(j, placeholders, 0));
  if (!v.is_dict()) return corrupt("the root is not a dict");
  return v.dict_ptr();
}

}  // namespace dsd

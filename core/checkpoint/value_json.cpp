#include "core/checkpoint/value_json.h"

#include <cmath>

#include "core/base/make_error.h"
#include "core/base/strings.h"
#include "core/checkpoint/manifest.h"
#include "core/formats/safetensors.h"

namespace dsd::checkpoint {
namespace {

using nlohmann::json;

Result<json> encode(const Value& v, std::string_view key) {
  switch (v.kind()) {
    case Kind::kNone: return json(nullptr);
    case Kind::kBool: return json(*v.if_bool());
    case Kind::kInt: return json(*v.if_int());
    case Kind::kDouble: {
      const double d = *v.if_double();
      if (std::isnan(d)) return json{{"double", "nan"}};
      if (std::isinf(d)) return json{{"double", d > 0 ? "inf" : "-inf"}};
      return json(d);
    }
    case Kind::kString: {
      const std::string& s = *v.if_string();
      if (safetensors::is_valid_utf8(s)) return json(s);
      return json{{"string_b64", base64_encode(s)}};
    }
    case Kind::kBytes: return json{{"bytes", base64_encode(v.if_bytes()->data)}};
    case Kind::kTensor:
      return make_error_at(Code::kUnsupported, std::string(key),
                           "'{}' holds a tensor inside a non-tensor value (a tuple or a list "
                           "that is not entered); store it as its own key",
                           key);
    case Kind::kList: {
      const List& l = *v.if_list();
      json arr = json::array();
      for (const Value& x : l.items()) arr.push_back(TRY(encode(x, key)));
      if (l.is_tuple()) return json{{"tuple", std::move(arr)}};
      return arr;
    }
    case Kind::kDict: {
      const Dict& d = *v.if_dict();
      json items = json::array();
      for (const auto& e : d) {
        if (!safetensors::is_valid_utf8(e.key)) {
          return make_error_at(Code::kUnsupported, std::string(key),
                               "'{}' holds a dict key that is not UTF-8", key);
        }
        items.push_back(json::array({e.key, TRY(encode(e.value, key))}));
      }
      return json{{"dict", std::move(items)}, {"int_keys", d.int_keys()}};
    }
  }
  return make_error(Code::kInternal, "unknown value kind at '{}'", key);
}

Result<Value> decode(const json& j, std::string_view key) {
  auto corrupt = [&] {
    return make_error_at(Code::kCorrupt, std::string(key), "value '{}' is malformed", key);
  };
  if (j.is_null()) return Value();
  if (j.is_boolean()) return Value(j.get<bool>());
  if (j.is_number_float()) return Value(j.get<double>());
  if (j.is_number_unsigned()) {
    if (j.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) return corrupt();
    return Value(static_cast<int64_t>(j.get<uint64_t>()));
  }
  if (j.is_number_integer()) return Value(j.get<int64_t>());
  if (j.is_string()) return Value(j.get<std::string>());
  if (j.is_array()) {
    ListPtr l = List::make(false);
    for (const json& x : j) l->push_back(TRY(decode(x, key)));
    return Value(std::move(l));
  }
  if (!j.is_object()) return corrupt();
  if (auto it = j.find("double"); it != j.end() && it->is_string()) {
    const auto& s = it->get_ref<const std::string&>();
    if (s == "nan") return Value(std::nan(""));
    if (s == "inf") return Value(INFINITY);
    if (s == "-inf") return Value(-INFINITY);
    return corrupt();
  }
  if (auto it = j.find("bytes"); it != j.end() && it->is_string()) {
    auto b = base64_decode(it->get_ref<const std::string&>());
    if (!b) return corrupt();
    return Value(Bytes{std::move(*b)});
  }
  if (auto it = j.find("string_b64"); it != j.end() && it->is_string()) {
    auto b = base64_decode(it->get_ref<const std::string&>());
    if (!b) return corrupt();
    return Value(std::move(*b));
  }
  if (auto it = j.find("tuple"); it != j.end() && it->is_array()) {
    ListPtr l = List::make(true);
    for (const json& x : *it) l->push_back(TRY(decode(x, key)));
    return Value(std::move(l));
  }
  if (auto it = j.find("dict"); it != j.end() && it->is_array()) {
    DictPtr d = Dict::make();
    for (const json& kv : *it) {
      if (!kv.is_array() || kv.size() != 2 || !kv[0].is_string()) return corrupt();
      d->set(kv[0].get<std::string>(), TRY(decode(kv[1], key)));
    }
    auto ik = j.find("int_keys");
    if (ik != j.end() && ik->is_boolean() && ik->get<bool>()) {
      for (const auto& e : *d) {
        if (!is_int_key(e.key)) return corrupt();
      }
      d->set_int_keys(true);
    }
    return Value(std::move(d));
  }
  return corrupt();
}

}  // namespace

Result<json> value_to_json(const Value& v, std::string_view key) { return encode(v, key); }

Result<Value> value_from_json(const json& v, std::string_view key) { return decode(v, key); }

}  // namespace dsd::checkpoint

#include "core/formats/torch_tensor_call.h"

#include <algorithm>

#include "core/base/make_error.h"

namespace dsd {
namespace {

std::string_view text_of(const PickleValue& v) {
  if (const std::string* s = v.if_str()) return *s;
  if (const std::string* b = v.if_bytes()) return *b;  // Python 2 era ids are bytes
  return {};
}

}  // namespace

// The dims of a torch.Size object (`torch.Size((2, 3))`), or nullptr.
const std::vector<PickleValue>* torch_size_dims(const PickleObject& o) {
  if (!o.is("torch", "Size")) return nullptr;
  const PickleTuple* args = o.args.if_tuple();
  if (args == nullptr || args->items.size() != 1 || args->items[0].if_tuple() == nullptr) return nullptr;
  return &args->items[0].if_tuple()->items;
}

namespace {

// A tuple (or torch.Size) of non-negative ints: a tensor's size or stride.
Result<std::vector<int64_t>> int_tuple(const PickleValue& v, std::string_view what) {
  const std::vector<PickleValue>* items = nullptr;
  if (const PickleTuple* t = v.if_tuple()) items = &t->items;
  if (const PickleObject* o = v.if_object()) items = torch_size_dims(*o);
  if (items == nullptr) {
    return make_error(Code::kCorrupt, "the tensor's {} is {}, not a tuple of ints", what, pickle_repr(v));
  }
  std::vector<int64_t> out;
  out.reserve(items->size());
  for (const PickleValue& item : *items) {
    const int64_t* i = item.if_int();
    if (i == nullptr || *i < 0) {
      return make_error(Code::kCorrupt, "the tensor's {} {} holds something other than non-negative ints",
                        what, pickle_repr(v));
    }
    out.push_back(*i);
  }
  return out;
}

Result<DType> dtype_of_global(const PickleValue& v) {
  const PickleGlobal* g = v.if_global();
  if (g == nullptr || g->module != "torch") {
    return make_error(Code::kCorrupt, "{} is not a torch dtype", pickle_repr(v));
  }
  std::optional<DType> d = dtype_from_name(g->name);
  if (!d) return make_error(Code::kDtypeMismatch, "dtype torch.{} is not supported by dsd", g->name);
  return *d;
}

Result<StorageRef> storage_ref(const PickleValue& v) {
  const PicklePersistentId* pid = v.if_persistent_id();
  const PickleTuple* t = pid != nullptr ? pid->id.if_tuple() : nullptr;
  if (t == nullptr || t->items.size() != 5 || text_of(t->items[0]) != "storage") {
    return make_error(Code::kCorrupt, "the tensor's storage is {}, not a persistent id "
                      "('storage', class, key, location, numel)", pickle_repr(v));
  }
  const auto& id = t->items;
  const PickleGlobal* cls = id[1].if_global();
  const int64_t* numel = id[4].if_int();
  std::string_view key = text_of(id[2]);
  if (cls == nullptr || numel == nullptr || *numel < 0 || key.empty() || key.size() > 64) {
    return make_error(Code::kCorrupt, "malformed storage persistent id {}", pickle_repr(pid->id));
  }
  StorageRef ref;
  ref.key = std::string(key);
  uint64_t elem = 1;
  if (cls->is("torch.storage", "UntypedStorage")) {
    ref.typed.reset();
  } else {
    std::optional<DType> d = cls->module == "torch" ? dtype_from_torch_storage_class(cls->name) : std::nullopt;
    if (!d) return make_error(Code::kUnsupported, "storage class {} is not supported by dsd", cls->full_name());
    ref.typed = *d;
    elem = element_size(*d);
  }
  if (static_cast<uint64_t>(*numel) > (uint64_t{1} << 62) / elem) {
    return make_error(Code::kCorrupt, "storage '{}' claims an absurd size of {} elements", ref.key, *numel);
  }
  ref.nbytes = static_cast<uint64_t>(*numel) * elem;
  return ref;
}

Status read_tensor_metadata(const PickleValue& v, TensorCall& call) {
  const PickleDict* d = v.if_dict();
  if (d == nullptr) return make_error(Code::kCorrupt, "tensor metadata {} is not a dict", pickle_repr(v));
  for (const auto& [k, val] : d->items) {
    const bool* b = val.if_bool();
    if (k.if_str() != nullptr && *k.if_str() == "conj" && b != nullptr) {
      call.conj = *b;
    } else if (k.if_str() != nullptr && *k.if_str() == "neg" && b != nullptr) {
      call.neg = *b;
    } else {
      return make_error(Code::kUnsupported, "tensor metadata {} is not supported", pickle_repr(v));
    }
  }
  return ok();
}

// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])` or
// `_rebuild_tensor_v3(..., hooks, dtype[, metadata])`.
Result<TensorCall> tensor_call_args(bool v3, const PickleTuple& args) {
  const auto& a = args.items;
  const size_t base = v3 ? 7 : 6;
  if (a.size() != base && a.size() != base + 1) {
    return make_error(Code::kCorrupt, "_rebuild_tensor_v{} takes {} or {} arguments, got {}", v3 ? 3 : 2,
                      base, base + 1, a.size());
  }
  TensorCall call;
  call.storage = TRY(storage_ref(a[0]));
  const int64_t* offset = a[1].if_int();
  if (offset == nullptr || *offset < 0) {
    return make_error(Code::kCorrupt, "the tensor's storage offset is {}", pickle_repr(a[1]));
  }
  call.storage_offset = *offset;
  call.sizes = TRY(int_tuple(a[2], "size"));
  call.strides = TRY(int_tuple(a[3], "stride"));
  if (call.sizes.size() != call.strides.size()) {
    return make_error(Code::kCorrupt, "the tensor has {} sizes but {} strides", call.sizes.size(),
                      call.strides.size());
  }
  if (a[4].if_bool() == nullptr) {
    return make_error(Code::kCorrupt, "the tensor's requires_grad is {}", pickle_repr(a[4]));
  }
  if (v3) {
    call.dtype = TRY(dtype_of_global(a[6]));
  } else if (call.storage.typed) {
    call.dtype = *call.storage.typed;
  } else {
    return make_error(Code::kCorrupt, "_rebuild_tensor_v2 on an UntypedStorage has no dtype");
  }
  if (a.size() == base + 1) TRY(read_tensor_metadata(a[base], call));
  return call;
}

}  // namespace

// Unwraps nn.Parameter and `_rebuild_from_type_v2` down to the tensor call; nullopt when
// `o` is not a tensor at all.
Result<std::optional<TensorCall>> as_tensor_call(const PickleObject& o) {
  const PickleGlobal* g = o.global();
  const PickleTuple* args = o.args.if_tuple();
  if (g == nullptr || args == nullptr || o.via != PickleObject::Via::kReduce) return std::optional<TensorCall>();
  const auto& a = args->items;
  if (g->module == "torch._utils") {
    if (g->name == "_rebuild_tensor_v2" || g->name == "_rebuild_tensor_v3") {
      return std::optional(TRY(tensor_call_args(g->name == "_rebuild_tensor_v3", *args)));
    }
    if (g->name == "_rebuild_parameter" || g->name == "_rebuild_parameter_with_state") {
      const PickleObject* data = a.empty() ? nullptr : a[0].if_object();
      std::optional<TensorCall> inner;
      if (data != nullptr) inner = TRY(as_tensor_call(*data));
      if (!inner) return make_error(Code::kCorrupt, "{} of something that is not a tensor", g->name);
      return inner;
    }
    return make_error(Code::kUnsupported, "tensors rebuilt by torch._utils.{} (quantized, sparse, nested, "
                      "meta or subclass tensors) are not supported by dsd", g->name);
  }
  if (g->is("torch._tensor", "_rebuild_from_type_v2")) {
    if (a.size() != 4 || a[0].if_global() == nullptr || a[1].if_global() == nullptr ||
        a[2].if_tuple() == nullptr) {
      return make_error(Code::kCorrupt, "malformed _rebuild_from_type_v2 call {}", pickle_repr(o.args));
    }
    const PickleGlobal& type = *a[1].if_global();
    if (!type.is("torch", "Tensor") && !type.is("torch.nn.parameter", "Parameter")) {
      return make_error(Code::kUnsupported, "tensor subclass {} is not supported by dsd", type.full_name());
    }
    PickleObject inner;
    inner.callable = a[0];
    inner.args = a[2];
    std::optional<TensorCall> call = TRY(as_tensor_call(inner));
    if (!call) return make_error(Code::kCorrupt, "_rebuild_from_type_v2 of {}", a[0].if_global()->full_name());
    return call;
  }
  return std::optional<TensorCall>();
}

namespace {
bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

// The bytes the tensor reaches into its storage: (offset + sum((size-1)*stride) + 1) elements;
// 0 for an empty tensor. Checked against overflow.
Result<uint64_t> tensor_extent_bytes(const TensorCall& c) {
  for (int64_t s : c.sizes) {
    if (s == 0) return uint64_t{0};
  }
  uint64_t last = static_cast<uint64_t>(c.storage_offset);
  for (size_t i = 0; i < c.sizes.size(); ++i) {
    uint64_t step = 0;
    if (mul_overflows(static_cast<uint64_t>(c.sizes[i] - 1), static_cast<uint64_t>(c.strides[i]), &step) ||
        __builtin_add_overflow(last, step, &last)) {
      return make_error(Code::kCorrupt, "the tensor's extent overflows");
    }
  }
  uint64_t bytes = 0;
  if (__builtin_add_overflow(last, uint64_t{1}, &last) || mul_overflows(last, element_size(c.dtype), &bytes)) {
    return make_error(Code::kCorrupt, "the tensor's extent overflows");
  }
  return bytes;
}

// Swaps each element of `data` from big- to little-endian (complex numbers part by part).
void byteswap(char* data, uint64_t nbytes, size_t width) {
  if (width <= 1) return;
  for (uint64_t i = 0; i + width <= nbytes; i += width) std::reverse(data + i, data + i + width);
}

size_t swap_width(DType dtype) {
  const bool complex = dtype == DType::kComplex64 || dtype == DType::kComplex128;
  return complex ? element_size(dtype) / 2 : element_size(dtype);
}

}  // namespace dsd

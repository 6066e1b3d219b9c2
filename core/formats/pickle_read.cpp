// The restricted unpickler: Python's pickle.py load loop, with every opcode that would import
// or call something replaced by building a node. See pickle.h for the contract.
#include <algorithm>
#include <charconv>
#include <cstring>
#include <limits>
#include <unordered_map>

#include "core/base/make_error.h"
#include "core/formats/pickle.h"
#include "core/formats/pickle_graph.h"
#include "core/formats/pickle_opcodes.h"
#include "core/formats/pickle_text.h"
#include "core/formats/utf8.h"

namespace dsd {
namespace {

using namespace pickle_ops;  // NOLINT: the opcodes
using namespace pickle_text;  // NOLINT: argument decoding

// `s` quoted for an error message, with anything but printable ASCII escaped: 'ab\xff'.
std::string shown(std::string_view s) {
  return pickle_repr(PickleValue::bytes(std::string(s.substr(0, 40)))).substr(1);
}

// Whether a value can be a dict key or set item (Python would raise TypeError otherwise).
bool hashable(const PickleValue& v) {
  using K = PickleValue::Kind;
  switch (v.kind()) {
    case K::kList:
    case K::kDict: return false;
    case K::kSet: return v.if_set()->frozen;
    default: return true;
  }
}

class Unpickler {
 public:
  Unpickler(std::string_view data, const PickleReadOptions& options)
      : data_(data), options_(options) {}

  ~Unpickler() { release(/*keep_reachable=*/false); }

  Result<PickleValue> run() {
    if (data_.size() > options_.max_bytes) {
      return make_error(Code::kCorrupt, "pickle data is corrupt at byte 0: it is {} bytes, more than the limit of {}",
                        data_.size(), options_.max_bytes);
    }
    while (true) {
      op_pos_ = pos_;
      if (pos_ >= data_.size()) {
        op_ = 0;
        return corrupt("the data ends before the STOP opcode");
      }
      op_ = static_cast<uint8_t>(data_[pos_++]);
      if (op_ == kStop) break;
      TRY(step());
    }
    PickleValue root = TRY(pop());
    TRY(validate(root));
    release(/*keep_reachable=*/true);
    return root;
  }

 private:
  // ---- errors and input -------------------------------------------------------------------

  Error corrupt(std::string_view what) const {
    std::string_view name = op_name(op_);
    if (name.empty()) {
      return make_error(Code::kCorrupt, "pickle data is corrupt at byte {}: {}", op_pos_, what);
    }
    return make_error(Code::kCorrupt, "pickle data is corrupt at byte {} ({}): {}", op_pos_, name,
                      what);
  }

  Error unsupported(std::string_view what) const {
    return make_error(Code::kUnsupported, "pickle at byte {} ({}): {}", op_pos_, op_name(op_), what);
  }

  Result<std::string_view> take(uint64_t n) {
    if (n > data_.size() - pos_) {
      return corrupt(fmt::format("truncated: needs {} bytes, {} left", n, data_.size() - pos_));
    }
    std::string_view out = data_.substr(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return out;
  }

  Result<uint64_t> take_le(size_t width) { return load_le(TRY(take(width))); }

  // A protocol-0 argument: the bytes up to the next newline (consumed, not returned).
  Result<std::string_view> line() {
    const size_t nl = data_.find('\n', pos_);
    if (nl == std::string_view::npos) return corrupt("truncated: the line has no newline");
    std::string_view out = data_.substr(pos_, nl - pos_);
    pos_ = nl + 1;
    return out;
  }

  // ---- stack ------------------------------------------------------------------------------

  // Items above the innermost MARK: the stack Python's pickle.py sees.
  size_t avail() const { return stack_.size() - (marks_.empty() ? 0 : marks_.back()); }

  Result<PickleValue> pop() {
    if (avail() == 0) return corrupt("stack underflow");
    PickleValue v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }

  Result<PickleValue*> top() {
    if (avail() == 0) return corrupt("stack underflow");
    return &stack_.back();
  }

  Result<std::vector<PickleValue>> pop_mark() {
    if (marks_.empty()) return corrupt("no MARK on the stack");
    const size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<PickleValue> items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(mark)),
                                   std::make_move_iterator(stack_.end()));
    stack_.resize(mark);
    return items;
  }

  void push(PickleValue v) { stack_.push_back(std::move(v)); }

  // Every node that holds other nodes is registered, so that release() can break whatever
  // cycles a hostile pickle built (and destroy deep chains without deep recursion).
  PickleValue track(PickleValue v) {
    containers_.push_back(v);
    return v;
  }

  Result<std::vector<std::pair<PickleValue, PickleValue>>> pairs(std::vector<PickleValue> items) {
    if (items.size() % 2 != 0) return corrupt("odd number of items for a dict");
    std::vector<std::pair<PickleValue, PickleValue>> out;
    out.reserve(items.size() / 2);
    for (size_t i = 0; i < items.size(); i += 2) {
      if (!hashable(items[i])) {
        return corrupt(fmt::format("unhashable dict key of type {}", pickle_kind_name(items[i].kind())));
      }
      out.emplace_back(std::move(items[i]), std::move(items[i + 1]));
    }
    return out;
  }

  // ---- memo -------------------------------------------------------------------------------

  Status memo_put(uint64_t index) {
    PickleValue* t = TRY(top());
    memo_.insert_or_assign(index, *t);
    return ok();
  }

  Status memo_get(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) return corrupt(fmt::format("memo index {} was never stored", index));
    push(it->second);
    return ok();
  }

  Result<uint64_t> text_index() {
    std::string_view s = TRY(line());
    uint64_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (!is_digits(s) || ec != std::errc() || p != s.data() + s.size()) {
      return corrupt(fmt::format("memo index {} is not a non-negative integer", shown(s)));
    }
    return v;
  }

  // ---- numbers and text -------------------------------------------------------------------

  Result<int64_t> text_int(std::string_view s) {
    int64_t v = 0;
    std::string_view digits = s;
    if (!digits.empty() && (digits.front() == '-' || digits.front() == '+')) digits.remove_prefix(1);
    if (!is_digits(digits)) {
      return corrupt(fmt::format("{} is not a decimal integer", shown(s)));
    }
    if (s.front() == '+') s.remove_prefix(1);
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec == std::errc::result_out_of_range) return unsupported("integers beyond int64 are not supported");
    if (ec != std::errc() || p != s.data() + s.size()) {
      return corrupt(fmt::format("{} is not a decimal integer", shown(s)));
    }
    return v;
  }

  // Two's complement little-endian, as LONG1 / LONG4 store it.
  Result<int64_t> long_bytes(std::string_view b) {
    if (b.empty()) return int64_t{0};
    const bool negative = (static_cast<unsigned char>(b.back()) & 0x80) != 0;
    if (b.size() > 8) {
      // Wider encodings are accepted when the extra bytes only repeat the sign.
      const unsigned char fill = negative ? 0xFF : 0x00;
      for (size_t i = 8; i < b.size(); ++i) {
        if (static_cast<unsigned char>(b[i]) != fill) {
          return unsupported("integers beyond int64 are not supported");
        }
      }
      if (((static_cast<unsigned char>(b[7]) & 0x80) != 0) != negative) {
        return unsupported("integers beyond int64 are not supported");
      }
      b = b.substr(0, 8);
    }
    uint64_t u = load_le(b);
    if (negative && b.size() < 8) u |= ~uint64_t{0} << (8 * b.size());
    return static_cast<int64_t>(u);
  }

  Result<PickleValue> utf8(std::string_view b) {
    if (!is_utf8_surrogatepass(b)) return corrupt("the string is not valid UTF-8");
    return PickleValue::str(std::string(b));
  }

  // Python 2 str: text if it is UTF-8, bytes otherwise.
  static PickleValue py2_str(std::string s) {
    if (is_utf8_surrogatepass(s)) return PickleValue::str(std::move(s));
    return PickleValue::bytes(std::move(s));
  }

  // ---- globals and objects ----------------------------------------------------------------

  Result<PickleValue> make_global(std::string module, std::string name) {
    // Python 3 reads protocol-2 pickles with fix_imports, which renames Python 2 modules.
    if (module == "__builtin__") module = "builtins";
    if (module == "copy_reg") module = "copyreg";
    if (options_.allow == nullptr || !options_.allow->allows(module, name)) {
      return make_error(Code::kUnsupported,
                        "pickle at byte {} refers to the global '{}.{}', which is not allowed here; "
                        "nothing was loaded or executed",
                        op_pos_, module, name);
    }
    return PickleValue::global(std::move(module), std::move(name));
  }

  Result<std::string> latin1_bytes(const PickleValue& text, const PickleValue& encoding) {
    const std::string* s = text.if_str();
    const std::string* enc = encoding.if_str();
    if (s == nullptr || enc == nullptr) {
      return corrupt("_codecs.encode needs (str, str) arguments");
    }
    if (*enc != "latin1" && *enc != "latin-1" && *enc != "iso-8859-1") {
      return unsupported(fmt::format("_codecs.encode with encoding {} is not supported", shown(*enc)));
    }
    std::string out;
    if (!utf8_to_latin1(*s, out)) return corrupt("_codecs.encode: the text is not Latin-1");
    return out;
  }

  // The pure reductions that only rebuild plain values (pickle.h lists them); nullopt for
  // anything else, which stays a PickleObject.
  Result<std::optional<PickleValue>> fold(const PickleGlobal& g, const PickleTuple& args) {
    const auto& a = args.items;
    if (g.is("_codecs", "encode") && a.size() == 2) {
      return std::optional(PickleValue::bytes(TRY(latin1_bytes(a[0], a[1]))));
    }
    if ((g.is("builtins", "bytes") || g.is("builtins", "bytearray")) && a.empty()) {
      return std::optional(PickleValue::bytes({}));
    }
    if (g.is("builtins", "bytearray") && a.size() == 1 && a[0].if_bytes() != nullptr) {
      return std::optional(PickleValue::bytes(*a[0].if_bytes()));
    }
    if (g.is("builtins", "set") || g.is("builtins", "frozenset")) {
      const bool frozen = g.name == "frozenset";
      if (a.empty()) return std::optional(track(PickleValue::set({}, frozen)));
      const std::vector<PickleValue>* items = nullptr;
      if (a.size() == 1 && a[0].if_list() != nullptr) items = &a[0].if_list()->items;
      if (a.size() == 1 && a[0].if_tuple() != nullptr) items = &a[0].if_tuple()->items;
      if (items != nullptr) {
        for (const PickleValue& item : *items) {
          if (!hashable(item)) return corrupt("unhashable set item");
        }
        return std::optional(track(PickleValue::set(*items, frozen)));
      }
    }
    return std::optional<PickleValue>();
  }

  Status reduce() {
    PickleValue args = TRY(pop());
    PickleValue* callable = TRY(top());
    const PickleGlobal* g = callable->if_global();
    if (g == nullptr) {
      return corrupt(fmt::format("REDUCE needs a global to call, got {}", pickle_kind_name(callable->kind())));
    }
    const PickleTuple* t = args.if_tuple();
    if (t == nullptr) {
      return corrupt(fmt::format("REDUCE needs an argument tuple, got {}", pickle_kind_name(args.kind())));
    }
    std::optional<PickleValue> folded = TRY(fold(*g, *t));
    if (folded) {
      *callable = std::move(*folded);
      return ok();
    }
    *callable = track(PickleValue::reduce(std::move(*callable), std::move(args)));
    return ok();
  }

  Status new_object(bool with_kwargs) {
    PickleValue kwargs;
    if (with_kwargs) {
      kwargs = TRY(pop());
      if (kwargs.if_dict() == nullptr) {
        return corrupt(fmt::format("NEWOBJ_EX needs a kwargs dict, got {}", pickle_kind_name(kwargs.kind())));
      }
    }
    PickleValue args = TRY(pop());
    PickleValue cls = TRY(pop());
    if (args.if_tuple() == nullptr) {
      return corrupt(fmt::format("needs an argument tuple, got {}", pickle_kind_name(args.kind())));
    }
    if (cls.if_global() == nullptr) {
      return corrupt(fmt::format("needs a class global, got {}", pickle_kind_name(cls.kind())));
    }
    auto obj = std::make_shared<PickleObject>();
    obj->via = with_kwargs ? PickleObject::Via::kNewObjEx : PickleObject::Via::kNewObj;
    obj->callable = std::move(cls);
    obj->args = std::move(args);
    obj->kwargs = std::move(kwargs);
    push(track(PickleValue::from(std::move(obj))));
    return ok();
  }

  Status build() {
    PickleValue state = TRY(pop());
    PickleValue* target = TRY(top());
    PickleObject* obj = target->if_object();
    if (obj == nullptr) {
      return corrupt(fmt::format("BUILD needs an object, got {}", pickle_kind_name(target->kind())));
    }
    if (obj->state) return corrupt("BUILD on an object that already has a state");
    obj->state = std::move(state);
    return ok();
  }

  Status append_items(std::vector<PickleValue> items) {
    PickleValue* target = TRY(top());
    std::vector<PickleValue>* dst = nullptr;
    if (PickleList* l = target->if_list()) dst = &l->items;
    if (PickleObject* o = target->if_object()) dst = &o->list_items;
    if (dst == nullptr) {
      return corrupt(fmt::format("can only append to a list or object, got {}", pickle_kind_name(target->kind())));
    }
    dst->insert(dst->end(), std::make_move_iterator(items.begin()), std::make_move_iterator(items.end()));
    return ok();
  }

  Status set_items(std::vector<PickleValue> flat) {
    auto items = TRY(pairs(std::move(flat)));
    PickleValue* target = TRY(top());
    std::vector<std::pair<PickleValue, PickleValue>>* dst = nullptr;
    if (PickleDict* d = target->if_dict()) dst = &d->items;
    if (PickleObject* o = target->if_object()) dst = &o->dict_items;
    if (dst == nullptr) {
      return corrupt(fmt::format("can only set items of a dict or object, got {}", pickle_kind_name(target->kind())));
    }
    dst->insert(dst->end(), std::make_move_iterator(items.begin()), std::make_move_iterator(items.end()));
    return ok();
  }

  Status add_items(std::vector<PickleValue> items) {
    PickleValue* target = TRY(top());
    PickleSet* s = target->if_set();
    if (s == nullptr || s->frozen) {
      return corrupt(fmt::format("ADDITEMS needs a set, got {}", pickle_kind_name(target->kind())));
    }
    for (const PickleValue& item : items) {
      if (!hashable(item)) return corrupt("unhashable set item");
    }
    s->items.insert(s->items.end(), std::make_move_iterator(items.begin()), std::make_move_iterator(items.end()));
    return ok();
  }

  Status persistent_id(PickleValue id) {
    if (!options_.allow_persistent_ids) return unsupported("persistent ids are not allowed here");
    push(track(PickleValue::persistent_id(std::move(id))));
    return ok();
  }

  Status tuple_of(size_t n) {
    if (avail() < n) return corrupt("stack underflow");
    std::vector<PickleValue> items(std::make_move_iterator(stack_.end() - static_cast<std::ptrdiff_t>(n)),
                                   std::make_move_iterator(stack_.end()));
    stack_.resize(stack_.size() - n);
    push(track(PickleValue::tuple(std::move(items))));
    return ok();
  }

  // ---- the opcode switch ------------------------------------------------------------------

  Status step() {
    switch (op_) {
      case kProto: {
        const auto proto = static_cast<unsigned>(TRY(take_le(1)));
        if (proto > 5) return unsupported(fmt::format("pickle protocol {} is newer than 5", proto));
        return ok();
      }
      case kFrame: {
        const uint64_t n = TRY(take_le(8));
        if (n > data_.size() - pos_) return corrupt(fmt::format("frame of {} bytes runs past the end", n));
        return ok();
      }
      case kMark: marks_.push_back(stack_.size()); return ok();
      case kPop:
        if (avail() > 0) {
          stack_.pop_back();
        } else {
          TRY(pop_mark());
        }
        return ok();
      case kPopMark: TRY(pop_mark()); return ok();
      case kDup: {
        PickleValue* t = TRY(top());
        push(*t);
        return ok();
      }

      case kNone: push(PickleValue()); return ok();
      case kNewTrue: push(PickleValue::boolean(true)); return ok();
      case kNewFalse: push(PickleValue::boolean(false)); return ok();
      case kInt: {
        std::string_view s = TRY(line());
        if (s == "00") {
          push(PickleValue::boolean(false));
        } else if (s == "01") {
          push(PickleValue::boolean(true));
        } else {
          push(PickleValue::integer(TRY(text_int(s))));
        }
        return ok();
      }
      case kLong: {
        std::string_view s = TRY(line());
        if (!s.empty() && s.back() == 'L') s.remove_suffix(1);
        push(PickleValue::integer(TRY(text_int(s))));
        return ok();
      }
      case kBinInt:
        push(PickleValue::integer(static_cast<int32_t>(static_cast<uint32_t>(TRY(take_le(4))))));
        return ok();
      case kBinInt1: push(PickleValue::integer(static_cast<int64_t>(TRY(take_le(1))))); return ok();
      case kBinInt2: push(PickleValue::integer(static_cast<int64_t>(TRY(take_le(2))))); return ok();
      case kLong1: {
        const uint64_t n = TRY(take_le(1));
        push(PickleValue::integer(TRY(long_bytes(TRY(take(n))))));
        return ok();
      }
      case kLong4: {
        const auto n = static_cast<int32_t>(static_cast<uint32_t>(TRY(take_le(4))));
        if (n < 0) return corrupt("negative byte count");
        push(PickleValue::integer(TRY(long_bytes(TRY(take(static_cast<uint64_t>(n)))))));
        return ok();
      }
      case kFloat: {
        std::string_view s = TRY(line());
        if (!s.empty() && s.front() == '+') s.remove_prefix(1);
        double d = 0;
        auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), d);
        if (ec != std::errc() || p != s.data() + s.size()) {
          return corrupt(fmt::format("{} is not a float", shown(s)));
        }
        push(PickleValue::floating(d));
        return ok();
      }
      case kBinFloat: {
        std::string_view b = TRY(take(8));
        uint64_t bits = 0;
        for (char c : b) bits = (bits << 8) | static_cast<unsigned char>(c);
        double d = 0;
        std::memcpy(&d, &bits, sizeof d);
        push(PickleValue::floating(d));
        return ok();
      }

      case kString: {
        std::string_view s = TRY(line());
        if (s.size() < 2 || s.front() != s.back() || (s.front() != '\'' && s.front() != '"')) {
          return corrupt("the STRING argument must be quoted");
        }
        std::string out;
        if (!escape_decode(s.substr(1, s.size() - 2), out)) return corrupt("malformed escape in STRING");
        push(py2_str(std::move(out)));
        return ok();
      }
      case kBinString: {
        const auto n = static_cast<int32_t>(static_cast<uint32_t>(TRY(take_le(4))));
        if (n < 0) return corrupt("negative byte count");
        push(py2_str(std::string(TRY(take(static_cast<uint64_t>(n))))));
        return ok();
      }
      case kShortBinString: push(py2_str(std::string(TRY(take(TRY(take_le(1))))))); return ok();
      case kUnicode: {
        std::string_view s = TRY(line());
        std::string out;
        if (!raw_unicode_escape_decode(s, out)) return corrupt("malformed \\u escape");
        push(PickleValue::str(std::move(out)));
        return ok();
      }
      case kShortBinUnicode: push(TRY(utf8(TRY(take(TRY(take_le(1))))))); return ok();
      case kBinUnicode: push(TRY(utf8(TRY(take(TRY(take_le(4))))))); return ok();
      case kBinUnicode8: push(TRY(utf8(TRY(take(TRY(take_le(8))))))); return ok();
      case kShortBinBytes: push(PickleValue::bytes(std::string(TRY(take(TRY(take_le(1))))))); return ok();
      case kBinBytes: push(PickleValue::bytes(std::string(TRY(take(TRY(take_le(4))))))); return ok();
      case kBinBytes8:
      case kByteArray8: push(PickleValue::bytes(std::string(TRY(take(TRY(take_le(8))))))); return ok();

      case kEmptyTuple: push(PickleValue::tuple({})); return ok();
      case kTuple1: return tuple_of(1);
      case kTuple2: return tuple_of(2);
      case kTuple3: return tuple_of(3);
      case kTuple: push(track(PickleValue::tuple(TRY(pop_mark())))); return ok();
      case kEmptyList: push(track(PickleValue::list())); return ok();
      case kList: push(track(PickleValue::list(TRY(pop_mark())))); return ok();
      case kEmptyDict: push(track(PickleValue::dict())); return ok();
      case kDict: push(track(PickleValue::dict(TRY(pairs(TRY(pop_mark())))))); return ok();
      case kEmptySet: push(track(PickleValue::set({}))); return ok();
      case kFrozenSet: {
        std::vector<PickleValue> items = TRY(pop_mark());
        for (const PickleValue& item : items) {
          if (!hashable(item)) return corrupt("unhashable set item");
        }
        push(track(PickleValue::set(std::move(items), true)));
        return ok();
      }
      case kAppend: {
        PickleValue item = TRY(pop());
        std::vector<PickleValue> one;
        one.push_back(std::move(item));
        return append_items(std::move(one));
      }
      case kAppends: return append_items(TRY(pop_mark()));
      case kSetItem: {
        PickleValue v = TRY(pop());
        PickleValue k = TRY(pop());
        std::vector<PickleValue> kv;
        kv.push_back(std::move(k));
        kv.push_back(std::move(v));
        return set_items(std::move(kv));
      }
      case kSetItems: return set_items(TRY(pop_mark()));
      case kAddItems: return add_items(TRY(pop_mark()));

      case kPut: return memo_put(TRY(text_index()));
      case kBinPut: return memo_put(TRY(take_le(1)));
      case kLongBinPut: return memo_put(TRY(take_le(4)));
      case kMemoize: return memo_put(memo_.size());
      case kGet: return memo_get(TRY(text_index()));
      case kBinGet: return memo_get(TRY(take_le(1)));
      case kLongBinGet: return memo_get(TRY(take_le(4)));

      case kGlobal: {
        std::string_view module = TRY(line());
        std::string_view name = TRY(line());
        if (!is_utf8_surrogatepass(module) || !is_utf8_surrogatepass(name)) {
          return corrupt("the global's name is not valid UTF-8");
        }
        push(TRY(make_global(std::string(module), std::string(name))));
        return ok();
      }
      case kStackGlobal: {
        PickleValue name = TRY(pop());
        PickleValue module = TRY(pop());
        if (name.if_str() == nullptr || module.if_str() == nullptr) {
          return corrupt("STACK_GLOBAL needs two strings");
        }
        push(TRY(make_global(*module.if_str(), *name.if_str())));
        return ok();
      }
      case kReduce: return reduce();
      case kNewObj: return new_object(false);
      case kNewObjEx: return new_object(true);
      case kBuild: return build();
      case kPersId: {
        std::string_view s = TRY(line());
        for (char c : s) {
          if (static_cast<unsigned char>(c) >= 0x80) return corrupt("the persistent id is not ASCII");
        }
        return persistent_id(PickleValue::str(std::string(s)));
      }
      case kBinPersId: return persistent_id(TRY(pop()));

      case kInst:
      case kObj: return unsupported("protocol 0/1 class instances (INST, OBJ) are not supported");
      case kExt1:
      case kExt2:
      case kExt4: return unsupported("the copyreg extension registry (EXT1/2/4) is not supported");
      case kNextBuffer:
      case kReadonlyBuffer: return unsupported("out-of-band buffers are not supported");
      default: return corrupt(fmt::format("unknown opcode 0x{:02x}", op_));
    }
  }

  // ---- the result -------------------------------------------------------------------------

  // Height of `v` (1 for a container of scalars), checking for cycles and for nesting deeper
  // than max_depth below `depth` enclosing containers. Shared nodes are visited once.
  Result<size_t> visit(const PickleValue& v, size_t depth) {
    if (!has_children(v)) return size_t{0};
    const void* node = v.node();
    auto [it, inserted] = heights_.try_emplace(node, 0);
    if (!inserted) {
      if (it->second == 0) return corrupt("a container contains itself (a cycle)");
      if (depth + it->second > options_.max_depth) return too_deep();
      return it->second;
    }
    if (depth + 1 > options_.max_depth) return too_deep();
    size_t height = 0;
    Status status = ok();
    for_each_child(v, [&](const PickleValue& c) {
      if (!status.ok()) return;
      Result<size_t> h = visit(c, depth + 1);
      if (!h.ok()) {
        status = std::move(h).error();
        return;
      }
      height = std::max(height, *h);
    });
    if (!status.ok()) return std::move(status).error();
    heights_[node] = height + 1;
    return height + 1;
  }

  Error too_deep() const {
    return corrupt(fmt::format("containers nest deeper than {} levels", options_.max_depth));
  }

  // The size of `v` as a tree (every shared reference expanded): nodes, and bytes of text.
  // Runs after visit(), so the graph is acyclic and at most max_depth deep; each distinct
  // node is summed once (saturating), so this is linear in the graph, not in its expansion.
  struct Expanded {
    uint64_t nodes = 0;
    uint64_t bytes = 0;
  };
  static uint64_t sat_add(uint64_t a, uint64_t b) {
    return a > std::numeric_limits<uint64_t>::max() - b ? std::numeric_limits<uint64_t>::max() : a + b;
  }
  Expanded expanded(const PickleValue& v) {
    if (!has_children(v)) {
      uint64_t bytes = 0;
      if (const std::string* s = v.if_str()) bytes = s->size();
      if (const std::string* b = v.if_bytes()) bytes = b->size();
      return {1, bytes};
    }
    auto it = expanded_.find(v.node());
    if (it != expanded_.end()) return it->second;
    Expanded sum{1, 0};
    for_each_child(v, [&](const PickleValue& c) {
      const Expanded e = expanded(c);
      sum.nodes = sat_add(sum.nodes, e.nodes);
      sum.bytes = sat_add(sum.bytes, e.bytes);
    });
    expanded_.emplace(v.node(), sum);
    return sum;
  }

  Status validate(const PickleValue& root) {
    TRY(visit(root, 0));
    const Expanded e = expanded(root);
    expanded_.clear();
    const uint64_t max_nodes = std::max<uint64_t>(options_.max_expanded_nodes, data_.size());
    const uint64_t max_bytes = std::max<uint64_t>(options_.max_expanded_bytes, data_.size());
    if (e.nodes > max_nodes) {
      return corrupt(fmt::format("its shared references expand to {} nodes, more than the limit of {} "
                                 "(a memo fan-out, \"billion laughs\")",
                                 e.nodes == std::numeric_limits<uint64_t>::max() ? std::string("2^64 or more")
                                                                                 : std::to_string(e.nodes),
                                 max_nodes));
    }
    if (e.bytes > max_bytes) {
      return corrupt(fmt::format("its shared references expand to {} bytes of text, more than the limit of {} "
                                 "(a memo fan-out, \"billion laughs\")",
                                 e.bytes == std::numeric_limits<uint64_t>::max() ? std::string("2^64 or more")
                                                                                 : std::to_string(e.bytes),
                                 max_bytes));
    }
    return ok();
  }

  // Empties every registered node that the result does not reach (all of them after an
  // error). The registry still owns each node while its children go, so no destructor
  // recurses, and cycles among unreachable nodes are broken.
  void release(bool keep_reachable) {
    for (const PickleValue& c : containers_) {
      if (keep_reachable && heights_.contains(c.node())) continue;
      clear_children(c);
    }
    containers_.clear();
  }

  std::string_view data_;
  const PickleReadOptions& options_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  uint8_t op_ = 0;
  std::vector<PickleValue> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PickleValue> memo_;
  std::vector<PickleValue> containers_;
  std::unordered_map<const void*, size_t> heights_;
  std::unordered_map<const void*, Expanded> expanded_;
};

}  // namespace

Result<PickleValue> pickle_loads(std::string_view data, const PickleReadOptions& options) {
  Unpickler unpickler(data, options);
  return unpickler.run();
}

}  // namespace dsd

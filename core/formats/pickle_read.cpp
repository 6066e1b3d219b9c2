// The restricted unpickler: Python's pickle.py load loop, with every opcode that would import
// or call something replaced by building a node. See pickle.h for the contract.
#include <charconv>
#include <cstring>
#include <limits>
#include <unordered_map>

#include "core/base/format.h"
#include "core/formats/pickle.h"
#include "core/formats/utf8.h"

namespace dsd {
namespace {

// Opcodes, by protocol (Lib/pickle.py).
enum Op : uint8_t {
  kMark = '(', kStop = '.', kPop = '0', kPopMark = '1', kDup = '2', kFloat = 'F', kInt = 'I',
  kBinInt = 'J', kBinInt1 = 'K', kLong = 'L', kBinInt2 = 'M', kNone = 'N', kPersId = 'P',
  kBinPersId = 'Q', kReduce = 'R', kString = 'S', kBinString = 'T', kShortBinString = 'U',
  kUnicode = 'V', kBinUnicode = 'X', kAppend = 'a', kBuild = 'b', kGlobal = 'c', kDict = 'd',
  kEmptyDict = '}', kAppends = 'e', kGet = 'g', kBinGet = 'h', kInst = 'i', kLongBinGet = 'j',
  kList = 'l', kEmptyList = ']', kObj = 'o', kPut = 'p', kBinPut = 'q', kLongBinPut = 'r',
  kSetItem = 's', kTuple = 't', kEmptyTuple = ')', kSetItems = 'u', kBinFloat = 'G',
  // protocol 2
  kProto = 0x80, kNewObj = 0x81, kExt1 = 0x82, kExt2 = 0x83, kExt4 = 0x84, kTuple1 = 0x85,
  kTuple2 = 0x86, kTuple3 = 0x87, kNewTrue = 0x88, kNewFalse = 0x89, kLong1 = 0x8a,
  kLong4 = 0x8b,
  // protocol 3
  kBinBytes = 'B', kShortBinBytes = 'C',
  // protocol 4
  kShortBinUnicode = 0x8c, kBinUnicode8 = 0x8d, kBinBytes8 = 0x8e, kEmptySet = 0x8f,
  kAddItems = 0x90, kFrozenSet = 0x91, kNewObjEx = 0x92, kStackGlobal = 0x93, kMemoize = 0x94,
  kFrame = 0x95,
  // protocol 5
  kByteArray8 = 0x96, kNextBuffer = 0x97, kReadonlyBuffer = 0x98,
};

std::string_view op_name(uint8_t op) {
  switch (op) {
    case kMark: return "MARK";
    case kStop: return "STOP";
    case kPop: return "POP";
    case kPopMark: return "POP_MARK";
    case kDup: return "DUP";
    case kFloat: return "FLOAT";
    case kInt: return "INT";
    case kBinInt: return "BININT";
    case kBinInt1: return "BININT1";
    case kLong: return "LONG";
    case kBinInt2: return "BININT2";
    case kNone: return "NONE";
    case kPersId: return "PERSID";
    case kBinPersId: return "BINPERSID";
    case kReduce: return "REDUCE";
    case kString: return "STRING";
    case kBinString: return "BINSTRING";
    case kShortBinString: return "SHORT_BINSTRING";
    case kUnicode: return "UNICODE";
    case kBinUnicode: return "BINUNICODE";
    case kAppend: return "APPEND";
    case kBuild: return "BUILD";
    case kGlobal: return "GLOBAL";
    case kDict: return "DICT";
    case kEmptyDict: return "EMPTY_DICT";
    case kAppends: return "APPENDS";
    case kGet: return "GET";
    case kBinGet: return "BINGET";
    case kInst: return "INST";
    case kLongBinGet: return "LONG_BINGET";
    case kList: return "LIST";
    case kEmptyList: return "EMPTY_LIST";
    case kObj: return "OBJ";
    case kPut: return "PUT";
    case kBinPut: return "BINPUT";
    case kLongBinPut: return "LONG_BINPUT";
    case kSetItem: return "SETITEM";
    case kTuple: return "TUPLE";
    case kEmptyTuple: return "EMPTY_TUPLE";
    case kSetItems: return "SETITEMS";
    case kBinFloat: return "BINFLOAT";
    case kProto: return "PROTO";
    case kNewObj: return "NEWOBJ";
    case kExt1: return "EXT1";
    case kExt2: return "EXT2";
    case kExt4: return "EXT4";
    case kTuple1: return "TUPLE1";
    case kTuple2: return "TUPLE2";
    case kTuple3: return "TUPLE3";
    case kNewTrue: return "NEWTRUE";
    case kNewFalse: return "NEWFALSE";
    case kLong1: return "LONG1";
    case kLong4: return "LONG4";
    case kBinBytes: return "BINBYTES";
    case kShortBinBytes: return "SHORT_BINBYTES";
    case kShortBinUnicode: return "SHORT_BINUNICODE";
    case kBinUnicode8: return "BINUNICODE8";
    case kBinBytes8: return "BINBYTES8";
    case kEmptySet: return "EMPTY_SET";
    case kAddItems: return "ADDITEMS";
    case kFrozenSet: return "FROZENSET";
    case kNewObjEx: return "NEWOBJ_EX";
    case kStackGlobal: return "STACK_GLOBAL";
    case kMemoize: return "MEMOIZE";
    case kFrame: return "FRAME";
    case kByteArray8: return "BYTEARRAY8";
    case kNextBuffer: return "NEXT_BUFFER";
    case kReadonlyBuffer: return "READONLY_BUFFER";
    default: return "";
  }
}

uint64_t load_le(std::string_view b) {
  uint64_t v = 0;
  for (size_t i = b.size(); i-- > 0;) v = (v << 8) | static_cast<unsigned char>(b[i]);
  return v;
}

bool is_digits(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

int hex_digit(char h) {
  if (h >= '0' && h <= '9') return h - '0';
  if (h >= 'a' && h <= 'f') return h - 'a' + 10;
  if (h >= 'A' && h <= 'F') return h - 'A' + 10;
  return -1;
}

// Python's codecs.escape_decode, which protocol 0 STRING uses. Returns false for a malformed
// \x escape, as Python does.
bool escape_decode(std::string_view s, std::string& out) {
  out.clear();
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\') {
      out += s[i];
      continue;
    }
    if (i + 1 == s.size()) return false;  // "Trailing \ in string"
    const char c = s[++i];
    switch (c) {
      case '\n': break;
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'v': out += '\v'; break;
      case 'x':
        if (i + 2 >= s.size() || hex_digit(s[i + 1]) < 0 || hex_digit(s[i + 2]) < 0) return false;
        out += static_cast<char>(hex_digit(s[i + 1]) * 16 + hex_digit(s[i + 2]));
        i += 2;
        break;
      default:
        if (c >= '0' && c <= '7') {
          int v = c - '0';
          for (int k = 0; k < 2 && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '7'; ++k) {
            v = v * 8 + (s[++i] - '0');
          }
          out += static_cast<char>(v & 0xFF);
        } else {
          out += '\\';
          out += c;
        }
    }
  }
  return true;
}

// Python's raw-unicode-escape decoding (protocol 0 UNICODE): bytes are Latin-1 code points,
// except \uXXXX and \UXXXXXXXX after an odd number of backslashes. Returns false when an
// escape is truncated or out of range.
bool raw_unicode_escape_decode(std::string_view s, std::string& out) {
  out.clear();
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] != '\\') {
      append_utf8(out, static_cast<unsigned char>(s[i++]));
      continue;
    }
    size_t run = 0;
    while (i < s.size() && s[i] == '\\') {
      out += '\\';
      ++i;
      ++run;
    }
    if (run % 2 == 0 || i >= s.size() || (s[i] != 'u' && s[i] != 'U')) continue;
    out.pop_back();
    int count = s[i] == 'u' ? 4 : 8;
    ++i;
    uint32_t cp = 0;
    for (; count > 0 && i < s.size(); --count, ++i) {
      const char h = s[i];
      const int d = hex_digit(h);
      if (d < 0) return false;
      cp = cp * 16 + static_cast<uint32_t>(d);
    }
    if (count > 0 || cp > 0x10FFFF) return false;
    append_utf8(out, cp);
  }
  return true;
}

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

  template <class F>
  static void for_each_child(const PickleValue& v, F&& f) {
    if (const PickleTuple* t = v.if_tuple()) {
      for (const auto& c : t->items) f(c);
    } else if (const PickleList* l = v.if_list()) {
      for (const auto& c : l->items) f(c);
    } else if (const PickleDict* d = v.if_dict()) {
      for (const auto& [k, c] : d->items) {
        f(k);
        f(c);
      }
    } else if (const PickleSet* s = v.if_set()) {
      for (const auto& c : s->items) f(c);
    } else if (const PickleObject* o = v.if_object()) {
      f(o->callable);
      f(o->args);
      f(o->kwargs);
      if (o->state) f(*o->state);
      for (const auto& c : o->list_items) f(c);
      for (const auto& [k, c] : o->dict_items) {
        f(k);
        f(c);
      }
    } else if (const PicklePersistentId* p = v.if_persistent_id()) {
      f(p->id);
    }
  }

  static bool has_children(const PickleValue& v) {
    using K = PickleValue::Kind;
    switch (v.kind()) {
      case K::kTuple:
      case K::kList:
      case K::kDict:
      case K::kSet:
      case K::kObject:
      case K::kPersistentId: return true;
      default: return false;
    }
  }

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

  Status validate(const PickleValue& root) {
    TRY(visit(root, 0));
    return ok();
  }

  static void clear_children(const PickleValue& v) {
    if (PickleTuple* t = v.if_tuple()) t->items.clear();
    if (PickleList* l = v.if_list()) l->items.clear();
    if (PickleDict* d = v.if_dict()) d->items.clear();
    if (PickleSet* s = v.if_set()) s->items.clear();
    if (PickleObject* o = v.if_object()) {
      o->args = PickleValue();
      o->kwargs = PickleValue();
      o->state.reset();
      o->list_items.clear();
      o->dict_items.clear();
    }
    if (PicklePersistentId* p = v.if_persistent_id()) p->id = PickleValue();
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
};

}  // namespace

Result<PickleValue> pickle_loads(std::string_view data, const PickleReadOptions& options) {
  Unpickler unpickler(data, options);
  return unpickler.run();
}

}  // namespace dsd

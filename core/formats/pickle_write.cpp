// The protocol-2 pickler: what Python's pickle.py writes with protocol=2, restricted to the
// opcodes torch's weights-only unpickler reads. See pickle.h for the contract.
#include <cstring>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "core/base/make_error.h"
#include "core/formats/pickle.h"
#include "core/formats/utf8.h"

namespace dsd {
namespace {

// Python batches APPENDS / SETITEMS in groups of this many items.
constexpr size_t kBatch = 1000;

class Pickler {
 public:
  explicit Pickler(const PickleWriteOptions& options) : options_(options) {}

  Result<std::string> run(const PickleValue& root) {
    TRY(count(root, 0));
    out_ += "\x80\x02";
    TRY(save(root));
    out_ += '.';
    return std::move(out_);
  }

 private:
  static Error invalid(std::string what) {
    return make_error(Code::kInvalidArgument, "cannot pickle: {}", what);
  }

  // ---- the pre-pass: which nodes are reachable twice, and no cycles ------------------------

  Status count(const PickleValue& v, size_t depth) {
    const void* node = v.node();
    if (node == nullptr) return ok();
    auto [it, first] = refs_.try_emplace(node, 1);
    if (!first) {
      if (in_progress_.contains(node)) return invalid("a container contains itself (a cycle)");
      ++it->second;
      return ok();
    }
    if (depth >= options_.max_depth) {
      return invalid(fmt::format("containers nest deeper than {} levels", options_.max_depth));
    }
    in_progress_.insert(node);
    Status status = ok();
    const auto each = [&](const PickleValue& c) {
      if (status.ok()) status = count(c, depth + 1);
    };
    if (const PickleTuple* t = v.if_tuple()) {
      for (const auto& c : t->items) each(c);
    } else if (const PickleList* l = v.if_list()) {
      for (const auto& c : l->items) each(c);
    } else if (const PickleDict* d = v.if_dict()) {
      for (const auto& [k, c] : d->items) {
        each(k);
        each(c);
      }
    } else if (const PickleSet* s = v.if_set()) {
      for (const auto& c : s->items) each(c);
    } else if (const PickleObject* o = v.if_object()) {
      each(o->callable);
      each(o->args);
      if (o->state) each(*o->state);
      for (const auto& c : o->list_items) each(c);
      for (const auto& [k, c] : o->dict_items) {
        each(k);
        each(c);
      }
    } else if (const PicklePersistentId* p = v.if_persistent_id()) {
      each(p->id);
    }
    in_progress_.erase(node);
    return status;
  }

  // ---- opcodes ----------------------------------------------------------------------------

  void put_le(uint64_t v, size_t width) {
    for (size_t i = 0; i < width; ++i) out_ += static_cast<char>((v >> (8 * i)) & 0xFF);
  }

  void memo_put(const void* node) {
    const uint32_t index = next_memo_++;
    if (node != nullptr) memo_.emplace(node, index);
    if (index < 256) {
      out_ += 'q';
      put_le(index, 1);
    } else {
      out_ += 'r';
      put_le(index, 4);
    }
  }

  // Memoises `v` if it is reachable more than once.
  void maybe_memo(const PickleValue& v) {
    const void* node = v.node();
    if (node != nullptr && refs_[node] > 1) memo_put(node);
  }

  void memo_get(uint32_t index) {
    if (index < 256) {
      out_ += 'h';
      put_le(index, 1);
    } else {
      out_ += 'j';
      put_le(index, 4);
    }
  }

  void save_int(int64_t v) {
    if (v >= 0 && v <= 0xFF) {
      out_ += 'K';
      put_le(static_cast<uint64_t>(v), 1);
    } else if (v >= 0 && v <= 0xFFFF) {
      out_ += 'M';
      put_le(static_cast<uint64_t>(v), 2);
    } else if (v >= -0x80000000LL && v <= 0x7FFFFFFFLL) {
      out_ += 'J';
      put_le(static_cast<uint64_t>(v), 4);
    } else {
      // LONG1: the shortest two's complement little-endian encoding, as encode_long writes.
      unsigned char b[8];
      for (size_t i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(static_cast<uint64_t>(v) >> (8 * i));
      size_t n = 8;
      while (n > 1 && ((b[n - 1] == 0x00 && (b[n - 2] & 0x80) == 0) ||
                       (b[n - 1] == 0xFF && (b[n - 2] & 0x80) != 0))) {
        --n;
      }
      out_ += '\x8a';
      out_ += static_cast<char>(n);
      out_.append(reinterpret_cast<const char*>(b), n);
    }
  }

  void save_float(double d) {
    uint64_t bits = 0;
    std::memcpy(&bits, &d, sizeof bits);
    out_ += 'G';
    for (int i = 7; i >= 0; --i) out_ += static_cast<char>((bits >> (8 * i)) & 0xFF);
  }

  Status save_text(std::string_view s) {
    if (!is_utf8_surrogatepass(s)) return invalid("a string is not valid UTF-8");
    if (s.size() > 0xFFFFFFFFu) return invalid("a string is longer than 4 GiB");
    out_ += 'X';
    put_le(s.size(), 4);
    out_ += s;
    return ok();
  }

  Status save_global(const PickleGlobal& g) {
    auto key = std::make_pair(g.module, g.name);
    auto it = globals_.find(key);
    if (it != globals_.end()) {
      memo_get(it->second);
      return ok();
    }
    if (g.module.find('\n') != std::string::npos || g.name.find('\n') != std::string::npos ||
        g.module.empty() || g.name.empty()) {
      return invalid(fmt::format("the global '{}' has an empty part or a newline", g.full_name()));
    }
    out_ += 'c';
    out_ += g.module;
    out_ += '\n';
    out_ += g.name;
    out_ += '\n';
    globals_.emplace(std::move(key), next_memo_);
    memo_put(nullptr);
    return ok();
  }

  Status save_bytes(const std::string& b) {
    // Python 3 writes bytes for protocol 2 as _codecs.encode(latin1_text, "latin1"); unlike
    // builtins.bytes(), torch's weights-only unpickler accepts that, even for b"".
    TRY(save_global(PickleGlobal{"_codecs", "encode"}));
    TRY(save_text(latin1_to_utf8(b)));
    TRY(save_text("latin1"));
    out_ += "\x86R";
    return ok();
  }

  Status save_items(const std::vector<PickleValue>& items) {
    for (size_t i = 0; i < items.size(); i += kBatch) {
      const size_t n = std::min(kBatch, items.size() - i);
      if (n == 1) {
        TRY(save(items[i]));
        out_ += 'a';
        continue;
      }
      out_ += '(';
      for (size_t k = i; k < i + n; ++k) TRY(save(items[k]));
      out_ += 'e';
    }
    return ok();
  }

  Status save_pairs(const std::vector<std::pair<PickleValue, PickleValue>>& items) {
    for (size_t i = 0; i < items.size(); i += kBatch) {
      const size_t n = std::min(kBatch, items.size() - i);
      if (n == 1) {
        TRY(save(items[i].first));
        TRY(save(items[i].second));
        out_ += 's';
        continue;
      }
      out_ += '(';
      for (size_t k = i; k < i + n; ++k) {
        TRY(save(items[k].first));
        TRY(save(items[k].second));
      }
      out_ += 'u';
    }
    return ok();
  }

  Status save_tuple(const std::vector<PickleValue>& items) {
    if (items.empty()) {
      out_ += ')';
      return ok();
    }
    if (items.size() > 3) out_ += '(';
    for (const auto& item : items) TRY(save(item));
    switch (items.size()) {
      case 1: out_ += '\x85'; break;
      case 2: out_ += '\x86'; break;
      case 3: out_ += '\x87'; break;
      default: out_ += 't'; break;
    }
    return ok();
  }

  Status save_object(const PickleObject& o) {
    const PickleGlobal* g = o.callable.if_global();
    if (g == nullptr) {
      return invalid(fmt::format("an object's callable is a {}, not a global",
                                 pickle_kind_name(o.callable.kind())));
    }
    const PickleTuple* args = o.args.if_tuple();
    if (args == nullptr) {
      return invalid(fmt::format("the arguments of {} are a {}, not a tuple", g->full_name(),
                                 pickle_kind_name(o.args.kind())));
    }
    if (o.via == PickleObject::Via::kNewObjEx) {
      return invalid(fmt::format("{} needs NEWOBJ_EX, which protocol 2 does not have", g->full_name()));
    }
    TRY(save(o.callable));
    TRY(save(o.args));
    out_ += o.via == PickleObject::Via::kReduce ? 'R' : '\x81';
    return ok();
  }

  // The parts of an object written after it is memoised, as pickle.py's save_reduce orders
  // them: list items, dict items, then state.
  Status save_object_tail(const PickleObject& o) {
    TRY(save_items(o.list_items));
    TRY(save_pairs(o.dict_items));
    if (o.state) {
      TRY(save(*o.state));
      out_ += 'b';
    }
    return ok();
  }

  Status save(const PickleValue& v) {
    using K = PickleValue::Kind;
    if (const void* node = v.node()) {
      auto it = memo_.find(node);
      if (it != memo_.end()) {
        memo_get(it->second);
        return ok();
      }
    }
    switch (v.kind()) {
      case K::kNone: out_ += 'N'; return ok();
      case K::kBool: out_ += *v.if_bool() ? '\x88' : '\x89'; return ok();
      case K::kInt: save_int(*v.if_int()); return ok();
      case K::kFloat: save_float(*v.if_float()); return ok();
      case K::kStr: TRY(save_text(*v.if_str())); break;
      case K::kBytes: TRY(save_bytes(*v.if_bytes())); break;
      case K::kTuple: TRY(save_tuple(v.if_tuple()->items)); break;
      case K::kList:
        out_ += ']';
        maybe_memo(v);
        return save_items(v.if_list()->items);
      case K::kDict:
        out_ += '}';
        maybe_memo(v);
        return save_pairs(v.if_dict()->items);
      case K::kSet: {
        const PickleSet& s = *v.if_set();
        TRY(save_global(PickleGlobal{"builtins", s.frozen ? "frozenset" : "set"}));
        out_ += ']';
        TRY(save_items(s.items));
        out_ += "\x85R";
        break;
      }
      case K::kGlobal: return save_global(*v.if_global());
      case K::kObject:
        TRY(save_object(*v.if_object()));
        maybe_memo(v);
        return save_object_tail(*v.if_object());
      case K::kPersistentId:
        TRY(save(v.if_persistent_id()->id));
        out_ += 'Q';
        break;
    }
    maybe_memo(v);
    return ok();
  }

  const PickleWriteOptions& options_;
  std::string out_;
  std::unordered_map<const void*, uint32_t> refs_;
  std::unordered_set<const void*> in_progress_;
  std::unordered_map<const void*, uint32_t> memo_;
  std::map<std::pair<std::string, std::string>, uint32_t> globals_;
  uint32_t next_memo_ = 0;
};

}  // namespace

Result<std::string> pickle_dumps(const PickleValue& root, const PickleWriteOptions& options) {
  Pickler pickler(options);
  return pickler.run(root);
}

}  // namespace dsd

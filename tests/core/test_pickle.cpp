// The restricted pickle reader and the protocol-2 writer: every opcode family against
// CPython's own output, memo sharing, round trips, and hostile input.
#include "core/formats/pickle.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "pickle_vectors.h"

namespace dsd {
namespace {

using ::testing::HasSubstr;
using K = PickleValue::Kind;

PickleValue S(std::string s) { return PickleValue::str(std::move(s)); }
PickleValue B(std::string s) { return PickleValue::bytes(std::move(s)); }
PickleValue I(int64_t v) { return PickleValue::integer(v); }
PickleValue F(double v) { return PickleValue::floating(v); }
PickleValue L(std::vector<PickleValue> items) { return PickleValue::list(std::move(items)); }
PickleValue T(std::vector<PickleValue> items) { return PickleValue::tuple(std::move(items)); }
PickleValue D(std::vector<std::pair<PickleValue, PickleValue>> items) {
  return PickleValue::dict(std::move(items));
}
PickleValue G(std::string m, std::string n) { return PickleValue::global(std::move(m), std::move(n)); }

// Structural equality; floats compare bitwise so -0.0 and NaN are checked exactly.
bool same(const PickleValue& a, const PickleValue& b, std::string* why);

bool same_seq(const std::vector<PickleValue>& a, const std::vector<PickleValue>& b, std::string* why) {
  if (a.size() != b.size()) {
    *why = "length " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (!same(a[i], b[i], why)) return false;
  }
  return true;
}

bool same_pairs(const std::vector<std::pair<PickleValue, PickleValue>>& a,
                const std::vector<std::pair<PickleValue, PickleValue>>& b, std::string* why) {
  if (a.size() != b.size()) {
    *why = "dict size " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (!same(a[i].first, b[i].first, why) || !same(a[i].second, b[i].second, why)) return false;
  }
  return true;
}

bool same(const PickleValue& a, const PickleValue& b, std::string* why) {
  if (a.kind() != b.kind()) {
    *why = pickle_repr(a) + " vs " + pickle_repr(b);
    return false;
  }
  bool eq = true;
  switch (a.kind()) {
    case K::kNone: break;
    case K::kBool: eq = *a.if_bool() == *b.if_bool(); break;
    case K::kInt: eq = *a.if_int() == *b.if_int(); break;
    case K::kFloat: eq = std::memcmp(a.if_float(), b.if_float(), sizeof(double)) == 0; break;
    case K::kStr: eq = *a.if_str() == *b.if_str(); break;
    case K::kBytes: eq = *a.if_bytes() == *b.if_bytes(); break;
    case K::kTuple: return same_seq(a.if_tuple()->items, b.if_tuple()->items, why);
    case K::kList: return same_seq(a.if_list()->items, b.if_list()->items, why);
    case K::kDict: return same_pairs(a.if_dict()->items, b.if_dict()->items, why);
    case K::kSet:
      eq = a.if_set()->frozen == b.if_set()->frozen;
      if (eq) return same_seq(a.if_set()->items, b.if_set()->items, why);
      break;
    case K::kGlobal: eq = a.if_global()->full_name() == b.if_global()->full_name(); break;
    case K::kObject: {
      const PickleObject& x = *a.if_object();
      const PickleObject& y = *b.if_object();
      if (x.via != y.via || x.state.has_value() != y.state.has_value()) {
        *why = "objects differ: " + pickle_repr(a) + " vs " + pickle_repr(b);
        return false;
      }
      return same(x.callable, y.callable, why) && same(x.args, y.args, why) &&
             same(x.kwargs, y.kwargs, why) && (!x.state || same(*x.state, *y.state, why)) &&
             same_seq(x.list_items, y.list_items, why) && same_pairs(x.dict_items, y.dict_items, why);
    }
    case K::kPersistentId: return same(a.if_persistent_id()->id, b.if_persistent_id()->id, why);
  }
  if (!eq) *why = pickle_repr(a) + " vs " + pickle_repr(b);
  return eq;
}

MATCHER_P(SameAs, expected, "") {
  std::string why;
  if (same(arg, expected, &why)) return true;
  *result_listener << why;
  return false;
}

const PickleAllowList& vector_allow_list() {
  static const PickleAllowList allow = {
      {"builtins", "set"},     {"builtins", "frozenset"}, {"builtins", "bytes"},
      {"builtins", "object"},  {"_codecs", "encode"},     {"copyreg", "_reconstructor"},
      {"vec", "Point"},        {"vec", "KwOnly"},
  };
  return allow;
}

Result<PickleValue> load(std::string_view data, PickleReadOptions options = {}) {
  if (options.allow == nullptr) options.allow = &vector_allow_list();
  return pickle_loads(data, options);
}

PickleValue load_ok(std::string_view data, PickleReadOptions options = {}) {
  Result<PickleValue> r = load(data, options);
  EXPECT_TRUE(r.ok()) << r.error().message;
  return r.ok() ? *r : PickleValue();
}

// tree() of gen_pickle_vectors.py, without "point" (which differs by protocol).
PickleValue expected_vector_tree() {
  const PickleValue shared = L({I(7)});
  return D({
      {S("ints"), L({I(0), I(1), I(-1), I(255), I(256), I(65535), I(65536), I(-2147483648LL),
                     I(2147483647), I(2147483648LL), I(-1099511627776LL), I(INT64_MAX), I(INT64_MIN)})},
      {S("floats"), L({F(1.5), F(-0.0), F(1e300), F(INFINITY)})},
      {S("strs"), L({S(""), S("abc"), S("\xc3\xbc\xe2\x82\xac\xf0\x9f\x98\x80"), S("line\nbreak\\")})},
      {S("bytes"), L({B(""), B(std::string("\x00\xff\n", 3))})},
      {S("consts"), L({PickleValue(), PickleValue::boolean(true), PickleValue::boolean(false)})},
      {S("tuples"), L({T({}), T({I(1)}), T({I(1), I(2)}), T({I(1), I(2), I(3)}),
                       T({I(1), I(2), I(3), I(4)})})},
      {S("sets"), L({PickleValue::set({I(5)}), PickleValue::set({I(6)}, true)})},
      {S("shared"), L({shared, shared})},
      {S("nested"), D({{I(1), D({{S("k"), T({T({})})}})}})},
  });
}

TEST(PickleRead, CPythonOutputInEveryProtocol) {
  for (int proto = 0; proto <= 5; ++proto) {
    SCOPED_TRACE("protocol " + std::to_string(proto));
    PickleValue root = load_ok(kVectorByProtocol[proto]);
    ASSERT_EQ(root.kind(), K::kDict);
    // "point" is checked on its own below; compare the rest.
    PickleDict* d = root.if_dict();
    ASSERT_FALSE(d->items.empty());
    PickleValue point = d->items.back().second;
    d->items.pop_back();
    EXPECT_THAT(root, SameAs(expected_vector_tree()));

    const PickleObject* obj = point.if_object();
    ASSERT_NE(obj, nullptr) << pickle_repr(point);
    ASSERT_TRUE(obj->state.has_value());
    EXPECT_THAT(*obj->state, SameAs(D({{S("x"), I(3)}})));
    if (proto < 2) {
      // copyreg._reconstructor(cls, object, None), then BUILD.
      EXPECT_EQ(obj->via, PickleObject::Via::kReduce);
      EXPECT_TRUE(obj->is("copyreg", "_reconstructor"));
      EXPECT_THAT(obj->args, SameAs(T({G("vec", "Point"), G("builtins", "object"), PickleValue()})));
    } else {
      EXPECT_EQ(obj->via, PickleObject::Via::kNewObj);
      EXPECT_TRUE(obj->is("vec", "Point"));
      EXPECT_THAT(obj->args, SameAs(T({})));
    }
  }
}

TEST(PickleRead, MemoKeepsSharing) {
  for (int proto = 0; proto <= 5; ++proto) {
    PickleValue root = load_ok(kVectorByProtocol[proto]);
    const PickleValue* shared = root.if_dict()->find("shared");
    ASSERT_NE(shared, nullptr);
    const auto& items = shared->if_list()->items;
    ASSERT_EQ(items.size(), 2u);
    EXPECT_NE(items[0].node(), nullptr);
    EXPECT_EQ(items[0].node(), items[1].node()) << "protocol " << proto;
  }
}

TEST(PickleRead, PersistentIdsAndNewObjEx) {
  PickleReadOptions options;
  options.allow_persistent_ids = true;
  PickleValue p0 = load_ok(kPersIdProtocol0, options);
  EXPECT_THAT(p0, SameAs(L({PickleValue::persistent_id(S("pid0"))})));

  PickleValue p4 = load_ok(kPersIdProtocol4, options);
  ASSERT_EQ(p4.kind(), K::kList);
  ASSERT_EQ(p4.if_list()->items.size(), 2u);
  EXPECT_THAT(p4.if_list()->items[0],
              SameAs(PickleValue::persistent_id(T({S("storage"), S("0"), I(12)}))));
  const PickleObject* kw = p4.if_list()->items[1].if_object();
  ASSERT_NE(kw, nullptr);
  EXPECT_EQ(kw->via, PickleObject::Via::kNewObjEx);
  EXPECT_TRUE(kw->is("vec", "KwOnly"));
  EXPECT_THAT(kw->args, SameAs(T({I(1)})));
  EXPECT_THAT(kw->kwargs, SameAs(D({{S("b"), I(2)}})));

  Result<PickleValue> refused = load(kPersIdProtocol4);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, Code::kUnsupported);
  EXPECT_THAT(refused.error().message, HasSubstr("persistent ids are not allowed"));
}

// Opcodes CPython does not emit for tree(): written by hand.
TEST(PickleRead, HandWrittenOpcodes) {
  using namespace std::string_view_literals;
  // POP, DUP, POP_MARK, text PUT/GET, LONG_BINPUT/LONG_BINGET.
  EXPECT_THAT(load_ok("K\x01K\x02" "0" "2" "(K\x03" "1" "\x86."sv), SameAs(T({I(1), I(1)})));
  EXPECT_THAT(load_ok("Vab\np12\n0g12\n."sv), SameAs(S("ab")));
  EXPECT_THAT(load_ok("K\x09r\x00\x01\x00\x00" "0j\x00\x01\x00\x00."sv), SameAs(I(9)));
  // STRING with escapes, BINSTRING, SHORT_BINSTRING; non-UTF-8 Python 2 str becomes bytes.
  EXPECT_THAT(load_ok("S'a\\x41\\n\\'\\101'\n."sv), SameAs(S("aA\n'A")));
  EXPECT_THAT(load_ok("T\x02\x00\x00\x00hi."sv), SameAs(S("hi")));
  EXPECT_THAT(load_ok("U\x01\xff."sv), SameAs(B("\xff")));
  // INT text, LONG text with and without L, LONG1 negative, LONG1 sign-padded, LONG4.
  EXPECT_THAT(load_ok("I01\nI00\n\x86."sv),
              SameAs(T({PickleValue::boolean(true), PickleValue::boolean(false)})));
  EXPECT_THAT(load_ok("I-17\n."sv), SameAs(I(-17)));
  EXPECT_THAT(load_ok("L123L\nL-5\n\x86."sv), SameAs(T({I(123), I(-5)})));
  EXPECT_THAT(load_ok("\x8a\x01\xff."sv), SameAs(I(-1)));
  EXPECT_THAT(load_ok("\x8a\x0a\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00."sv), SameAs(I(1)));
  EXPECT_THAT(load_ok("\x8b\x02\x00\x00\x00\x00\x80."sv), SameAs(I(-32768)));
  EXPECT_THAT(load_ok("\x8a\x00."sv), SameAs(I(0)));
  // BINUNICODE8, BINBYTES8, BYTEARRAY8, SHORT_BINBYTES inside a FRAME.
  EXPECT_THAT(load_ok("\x80\x05\x95\x0b\x00\x00\x00\x00\x00\x00\x00"
                      "\x8d\x01\x00\x00\x00\x00\x00\x00\x00z."sv),
              SameAs(S("z")));
  EXPECT_THAT(load_ok("\x8e\x02\x00\x00\x00\x00\x00\x00\x00xy\x96\x00\x00\x00\x00\x00\x00\x00\x00"
                      "C\x01q\x87."sv),
              SameAs(T({B("xy"), B(""), B("q")})));
  // LIST, DICT and TUPLE from a MARK; STACK_GLOBAL; FLOAT text; EMPTY_SET + ADDITEMS.
  EXPECT_THAT(load_ok("(K\x01K\x02l(K\x01K\x02" "d(K\x03K\x04t\x87."sv),
              SameAs(T({L({I(1), I(2)}), D({{I(1), I(2)}}), T({I(3), I(4)})})));
  EXPECT_THAT(load_ok("\x8c\x03vec\x8c\x05Point\x93."sv), SameAs(G("vec", "Point")));
  EXPECT_THAT(load_ok("F-2.5e3\n."sv), SameAs(F(-2500.0)));
  EXPECT_THAT(load_ok("\x8f(K\x01K\x02\x90."sv), SameAs(PickleValue::set({I(1), I(2)})));
  // Bytes after STOP are ignored, as Python does.
  EXPECT_THAT(load_ok("N.garbage"sv), SameAs(PickleValue()));
}

TEST(PickleRead, ObjectsCarryItemsAndState) {
  using namespace std::string_view_literals;
  const PickleAllowList allow = {{"collections", "OrderedDict"}};
  PickleReadOptions options;
  options.allow = &allow;
  // OrderedDict() with SETITEMS and a BUILD of its __dict__, as nn.Module.state_dict() pickles.
  PickleValue v = load_ok("ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00" "aK\x01u}b."sv, options);
  const PickleObject* o = v.if_object();
  ASSERT_NE(o, nullptr);
  EXPECT_TRUE(o->is("collections", "OrderedDict"));
  EXPECT_THAT(o->args, SameAs(T({})));
  ASSERT_EQ(o->dict_items.size(), 1u);
  EXPECT_THAT(o->dict_items[0].first, SameAs(S("a")));
  ASSERT_TRUE(o->state.has_value());
  EXPECT_THAT(*o->state, SameAs(D({})));
}

// ---- the writer -------------------------------------------------------------------------

TEST(PickleWrite, RoundTripKeepsTreeAndSharing) {
  PickleValue root = expected_vector_tree();
  auto point = std::make_shared<PickleObject>();
  point->via = PickleObject::Via::kNewObj;
  point->callable = G("vec", "Point");
  point->args = T({});
  point->state = D({{S("x"), I(3)}});
  root.if_dict()->items.emplace_back(S("point"), PickleValue::from(point));
  root.if_dict()->items.emplace_back(S("pid"), PickleValue::persistent_id(T({S("storage"), S("0")})));
  // More than one APPENDS / SETITEMS batch.
  std::vector<PickleValue> many;
  for (int i = 0; i < 2500; ++i) many.push_back(I(i));
  root.if_dict()->items.emplace_back(S("many"), L(many));

  Result<std::string> bytes = pickle_dumps(root);
  ASSERT_TRUE(bytes.ok()) << bytes.error().message;
  EXPECT_EQ(bytes->substr(0, 2), "\x80\x02");
  PickleReadOptions options;
  options.allow_persistent_ids = true;
  PickleValue back = load_ok(*bytes, options);
  EXPECT_THAT(back, SameAs(root));
  const auto& shared = back.if_dict()->find("shared")->if_list()->items;
  EXPECT_EQ(shared[0].node(), shared[1].node());
}

TEST(PickleWrite, ProtocolTwoEncodings) {
  const auto dump = [](const PickleValue& v) { return MUST(pickle_dumps(v)); };
  using namespace std::string_literals;
  EXPECT_EQ(dump(I(255)), "\x80\x02K\xff."s);
  EXPECT_EQ(dump(I(256)), "\x80\x02M\x00\x01."s);
  EXPECT_EQ(dump(I(-1)), "\x80\x02J\xff\xff\xff\xff."s);
  // 2**40 as LONG1 with CPython's minimal encoding; -2**63 in 8 bytes.
  EXPECT_EQ(dump(I(int64_t{1} << 40)), "\x80\x02\x8a\x06\x00\x00\x00\x00\x00\x01."s);
  EXPECT_EQ(dump(I(INT64_MIN)), "\x80\x02\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80."s);
  EXPECT_EQ(dump(F(1.5)), "\x80\x02G\x3f\xf8\x00\x00\x00\x00\x00\x00."s);
  EXPECT_EQ(dump(S("hi")), "\x80\x02X\x02\x00\x00\x00hi."s);
  // Bytes as _codecs.encode(latin1 text, "latin1"), even when empty.
  EXPECT_EQ(dump(B("\xff")), "\x80\x02" "c_codecs\nencode\nq\x00X\x02\x00\x00\x00\xc3\xbfX\x06\x00\x00\x00latin1\x86R."s);
  // Unshared containers are not memoised; each global is written once.
  EXPECT_EQ(dump(L({T({I(1), I(2)})})), "\x80\x02]K\x01K\x02\x86" "a."s);
  EXPECT_EQ(dump(T({G("a", "b"), G("a", "b")})), "\x80\x02" "ca\nb\nq\x00h\x00\x86."s);
}

TEST(PickleWrite, RefusesWhatItCannotWrite) {
  PickleValue cyclic = L({});
  cyclic.if_list()->items.push_back(cyclic);
  Result<std::string> r = pickle_dumps(cyclic);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kInvalidArgument);
  EXPECT_THAT(r.error().message, HasSubstr("cycle"));
  cyclic.if_list()->items.clear();  // no leak

  r = pickle_dumps(S("\xff"));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("not valid UTF-8"));

  auto kw = std::make_shared<PickleObject>();
  kw->via = PickleObject::Via::kNewObjEx;
  kw->callable = G("m", "C");
  kw->args = T({});
  r = pickle_dumps(PickleValue::from(kw));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("NEWOBJ_EX"));

  r = pickle_dumps(G("m\n", "C"));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("newline"));

  PickleValue deep = I(0);
  for (int i = 0; i < 300; ++i) deep = T({deep});
  r = pickle_dumps(deep);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("deeper than 200"));
}

// ---- hostile input ----------------------------------------------------------------------

struct Hostile {
  const char* name;
  std::string data;
  Code code;
  const char* message;
};

void PrintTo(const Hostile& h, std::ostream* os) { *os << h.name; }

class PickleHostile : public ::testing::TestWithParam<Hostile> {};

TEST_P(PickleHostile, FailsCleanly) {
  const Hostile& h = GetParam();
  PickleReadOptions options;
  options.max_depth = 50;
  Result<PickleValue> r = load(h.data, options);
  ASSERT_FALSE(r.ok()) << pickle_repr(*r);
  EXPECT_EQ(r.error().code, h.code) << r.error().message;
  EXPECT_THAT(r.error().message, HasSubstr(h.message));
}

std::string repeat(std::string_view s, size_t n) {
  std::string out;
  for (size_t i = 0; i < n; ++i) out += s;
  return out;
}

using namespace std::string_literals;
INSTANTIATE_TEST_SUITE_P(
    All, PickleHostile,
    ::testing::Values(
        Hostile{"empty", "", Code::kCorrupt, "at byte 0: the data ends before the STOP opcode"},
        Hostile{"no_stop", "\x80\x02K\x01"s, Code::kCorrupt, "at byte 4: the data ends before"},
        Hostile{"truncated_string", "\x80\x02X\x05\x00\x00\x00" "ab"s, Code::kCorrupt,
                "at byte 2 (BINUNICODE): truncated: needs 5 bytes, 2 left"},
        Hostile{"truncated_length", "\x80\x02X\x05\x00"s, Code::kCorrupt,
                "at byte 2 (BINUNICODE): truncated: needs 4 bytes, 2 left"},
        Hostile{"truncated_line", "\x80\x02" "cos\nsys"s, Code::kCorrupt,
                "at byte 2 (GLOBAL): truncated: the line has no newline"},
        Hostile{"unknown_opcode", "\x80\x02\xff."s, Code::kCorrupt,
                "at byte 2: unknown opcode 0xff"},
        Hostile{"underflow", "\x80\x02" "a."s, Code::kCorrupt, "at byte 2 (APPEND): stack underflow"},
        Hostile{"stop_on_empty", "."s, Code::kCorrupt, "at byte 0 (STOP): stack underflow"},
        Hostile{"underflow_past_mark", "]K\x01(a."s, Code::kCorrupt,
                "at byte 4 (APPEND): stack underflow"},
        Hostile{"tuple3_underflow", "K\x01K\x02\x87."s, Code::kCorrupt,
                "at byte 4 (TUPLE3): stack underflow"},
        Hostile{"no_mark", "]K\x01" "e."s, Code::kCorrupt, "at byte 3 (APPENDS): no MARK"},
        Hostile{"bad_memo", "\x80\x02h\x05."s, Code::kCorrupt,
                "at byte 2 (BINGET): memo index 5 was never stored"},
        Hostile{"bad_long_memo", "j\xff\xff\xff\xff."s, Code::kCorrupt,
                "memo index 4294967295 was never stored"},
        Hostile{"put_on_empty", "q\x00N."s, Code::kCorrupt, "at byte 0 (BINPUT): stack underflow"},
        Hostile{"huge_bytes8", "\x8e\x00\x00\x00\x00\x00\x00\x00\x40."s, Code::kCorrupt,
                "(BINBYTES8): truncated: needs 4611686018427387904 bytes, 1 left"},
        Hostile{"huge_unicode8", "\x8d\xff\xff\xff\xff\xff\xff\xff\xff."s, Code::kCorrupt,
                "truncated: needs 18446744073709551615 bytes"},
        Hostile{"huge_frame", "\x80\x04\x95\x00\x00\x00\x00\x00\x01\x00\x00N."s, Code::kCorrupt,
                "(FRAME): frame of 1099511627776 bytes runs past the end"},
        Hostile{"negative_long4", "\x8b\xff\xff\xff\xff."s, Code::kCorrupt,
                "(LONG4): negative byte count"},
        Hostile{"negative_binstring", "T\xfe\xff\xff\xff."s, Code::kCorrupt,
                "(BINSTRING): negative byte count"},
        Hostile{"deep_tuples", "K\x01" + repeat("\x85", 60) + ".", Code::kCorrupt,
                "at byte 62 (STOP): containers nest deeper than 50 levels"},
        Hostile{"very_deep_lists", repeat("]", 200000) + repeat("a", 199999) + ".", Code::kCorrupt,
                "containers nest deeper than 50 levels"},
        Hostile{"very_deep_tuples", "N" + repeat("\x85", 500000) + ".", Code::kCorrupt,
                "containers nest deeper than 50 levels"},
        Hostile{"cycle", "]q\x00h\x00" "a."s, Code::kCorrupt, "a container contains itself"},
        Hostile{"cycle_through_dict", "}q\x00K\x01]h\x00" "as."s, Code::kCorrupt,
                "a container contains itself"},
        Hostile{"reduce_non_global", "K\x01)R."s, Code::kCorrupt,
                "(REDUCE): REDUCE needs a global to call, got int"},
        Hostile{"reduce_non_tuple", "\x8c\x03vec\x8c\x05Point\x93K\x01R."s, Code::kCorrupt,
                "REDUCE needs an argument tuple, got int"},
        Hostile{"build_non_object", "]}b."s, Code::kCorrupt, "(BUILD): BUILD needs an object, got list"},
        Hostile{"append_to_int", "K\x01K\x02" "a."s, Code::kCorrupt,
                "(APPEND): can only append to a list or object, got int"},
        Hostile{"setitem_on_list", "]K\x01K\x02s."s, Code::kCorrupt,
                "can only set items of a dict or object, got list"},
        Hostile{"odd_setitems", "}(K\x01u."s, Code::kCorrupt, "odd number of items for a dict"},
        Hostile{"unhashable_key", "}]K\x01s."s, Code::kCorrupt, "unhashable dict key of type list"},
        Hostile{"bad_utf8", "X\x01\x00\x00\x00\xff."s, Code::kCorrupt,
                "at byte 0 (BINUNICODE): the string is not valid UTF-8"},
        Hostile{"overlong_utf8", "\x8c\x02\xc0\xaf."s, Code::kCorrupt, "not valid UTF-8"},
        Hostile{"bad_text_int", "I12x\n."s, Code::kCorrupt, "(INT): '12x' is not a decimal integer"},
        Hostile{"bad_float", "Fnope\n."s, Code::kCorrupt, "(FLOAT): 'nope' is not a float"},
        Hostile{"unquoted_string", "Sabc\n."s, Code::kCorrupt, "must be quoted"},
        Hostile{"bad_unicode_escape", "V\\u12\n."s, Code::kCorrupt, "malformed \\u escape"},
        Hostile{"stack_global_non_str", "K\x01K\x02\x93."s, Code::kCorrupt,
                "STACK_GLOBAL needs two strings"},
        Hostile{"newobj_non_class", "K\x01)\x81."s, Code::kCorrupt, "needs a class global, got int"},
        Hostile{"disallowed_global", "\x80\x02" "cos\nsystem\nX\x02\x00\x00\x00ls\x85R."s,
                Code::kUnsupported, "refers to the global 'os.system', which is not allowed here"},
        Hostile{"disallowed_stack_global", "\x8c\x05posix\x8c\x06system\x93."s, Code::kUnsupported,
                "global 'posix.system'"},
        Hostile{"disallowed_builtin", "c__builtin__\neval\n."s, Code::kUnsupported,
                "global 'builtins.eval'"},
        Hostile{"big_int", "\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00."s, Code::kUnsupported,
                "integers beyond int64 are not supported"},
        Hostile{"big_text_int", "L99999999999999999999L\n."s, Code::kUnsupported,
                "integers beyond int64"},
        Hostile{"protocol_6", "\x80\x06N."s, Code::kUnsupported, "pickle protocol 6 is newer than 5"},
        Hostile{"inst", "(i__main__\nC\n."s, Code::kUnsupported, "(INST): protocol 0/1 class instances"},
        Hostile{"ext1", "\x82\x01."s, Code::kUnsupported, "extension registry"},
        Hostile{"next_buffer", "\x97."s, Code::kUnsupported, "out-of-band buffers"},
        Hostile{"persid_refused", "Pid\n."s, Code::kUnsupported, "persistent ids are not allowed"}),
    [](const ::testing::TestParamInfo<Hostile>& info) { return std::string(info.param.name); });

TEST(PickleRead, SizeLimit) {
  PickleReadOptions options;
  options.max_bytes = 4;
  Result<PickleValue> r = load("\x80\x02K\x01.", options);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kCorrupt);
  EXPECT_THAT(r.error().message, HasSubstr("at byte 0: it is 5 bytes, more than the limit of 4"));
}

TEST(PickleRead, UnreachableCycleIsDropped) {
  // A self-referencing list left in the memo while the result is None: loads fine, and the
  // cycle is broken (LeakSanitizer in the fuzz build would report it otherwise).
  PickleValue v = load_ok(std::string_view("]q\x00h\x00" "a0N.", 9));
  EXPECT_TRUE(v.is_none());
}

TEST(PickleRead, EmptyAllowListRefusesEveryGlobal) {
  PickleReadOptions options;
  const PickleAllowList none;
  options.allow = &none;
  Result<PickleValue> r = pickle_loads("ccollections\nOrderedDict\n.", options);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("'collections.OrderedDict'"));
}

TEST(PickleRepr, ReadsLikePython) {
  EXPECT_EQ(pickle_repr(T({I(1), S("a'b"), B("\x01"), PickleValue()})), "(1, 'a\\'b', b'\\x01', None)");
  EXPECT_EQ(pickle_repr(T({I(1)})), "(1,)");
  EXPECT_EQ(pickle_repr(PickleValue::reduce(G("torch", "Size"), T({T({I(2)})}))), "torch.Size((2,),)");
  EXPECT_EQ(pickle_repr(L(std::vector<PickleValue>(100, I(1))), 10).size(), 13u);
}

}  // namespace
}  // namespace dsd

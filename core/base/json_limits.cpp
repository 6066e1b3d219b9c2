#include "core/base/json_limits.h"

#include <set>
#include <string>
#include <vector>

#include "core/base/make_error.h"

namespace dsd {
namespace {

using nlohmann::json;

// A SAX pass that builds nothing: tracks the depth and the member names of each open
// object, and stops at the first violation (nlohmann's parsers, the msgpack one included,
// stop descending as soon as a handler returns false).
class LimitChecker {
 public:
  explicit LimitChecker(int max_depth) : max_depth_(max_depth) {}

  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(json::number_integer_t) { return true; }
  bool number_unsigned(json::number_unsigned_t) { return true; }
  bool number_float(json::number_float_t, const json::string_t&) { return true; }
  bool string(json::string_t&) { return true; }
  bool binary(json::binary_t&) { return true; }
  bool start_object(std::size_t) {
    if (!enter()) return false;
    names_.emplace_back();
    return true;
  }
  bool key(json::string_t& k) {
    if (!names_.back().insert(k).second) {
      problem_ = fmt::format("repeats the member name '{}' in one object", k);
      return false;
    }
    return true;
  }
  bool end_object() {
    names_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) { return enter(); }
  bool end_array() {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) {
    syntax_ = true;
    return false;
  }

  const std::string& problem() const { return problem_; }
  bool syntax_error() const { return syntax_; }

 private:
  bool enter() {
    if (++depth_ > max_depth_) {
      problem_ = fmt::format("nests arrays and objects deeper than {} levels", max_depth_);
      return false;
    }
    return true;
  }

  int max_depth_;
  int depth_ = 0;
  std::vector<std::set<std::string>> names_;
  std::string problem_;
  bool syntax_ = false;
};

Error corrupt(std::string_view what, std::string_view problem) {
  return make_error_at(Code::kCorrupt, std::string(what), "{} {}", what, problem);
}

}  // namespace

Result<json> parse_json_strict(std::string_view text, std::string_view what, int max_depth) {
  LimitChecker checker(max_depth);
  const bool ok_scan = json::sax_parse(text.begin(), text.end(), &checker, nlohmann::detail::input_format_t::json,
                                       /*strict=*/true);
  if (!checker.problem().empty()) return corrupt(what, checker.problem());
  if (!ok_scan || checker.syntax_error()) return corrupt(what, "is not valid JSON");
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return corrupt(what, "is not valid JSON");
  return j;
}

Result<json> parse_msgpack_strict(std::span<const uint8_t> bytes, std::string_view what, int max_depth) {
  LimitChecker checker(max_depth);
  const bool ok_scan = json::sax_parse(bytes.begin(), bytes.end(), &checker, nlohmann::detail::input_format_t::msgpack,
                                       /*strict=*/true);
  if (!checker.problem().empty()) return corrupt(what, checker.problem());
  if (!ok_scan || checker.syntax_error()) return corrupt(what, "is not valid msgpack");
  json j = json::from_msgpack(bytes.begin(), bytes.end(), /*strict=*/true, /*allow_exceptions=*/false);
  if (j.is_discarded()) return corrupt(what, "is not valid msgpack");
  return j;
}

}  // namespace dsd

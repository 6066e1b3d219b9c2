#include "core/statedict/fqn.h"

#include <vector>

#include "core/base/make_error.h"

namespace dsd {
namespace {

constexpr std::string_view kCheckpointPrefix = "_checkpoint_wrapped_module.";
constexpr std::string_view kExtraState = "_extra_state";

std::string remove_all(std::string_view s, std::string_view needle) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (true) {
    const size_t hit = s.find(needle, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos));
    pos = hit + needle.size();
  }
  out.append(s.substr(pos));
  return out;
}

std::vector<std::string_view> split(std::string_view s) {
  std::vector<std::string_view> out;
  size_t pos = 0;
  while (true) {
    const size_t dot = s.find('.', pos);
    out.push_back(s.substr(pos, dot == std::string_view::npos ? std::string_view::npos : dot - pos));
    if (dot == std::string_view::npos) break;
    pos = dot + 1;
  }
  return out;
}

void append(std::string& out, std::string_view token) {
  if (!out.empty()) out += '.';
  out += token;
}

// Declared paths are raw module paths; checkpoint-wrapper tokens vanish from names before
// they are walked, so they vanish from paths too.
std::string normalize_path(std::string path) {
  if (path.empty()) return path;
  std::string p = remove_all(path + ".", kCheckpointPrefix);
  if (!p.empty() && p.back() == '.') p.pop_back();
  return p;
}

}  // namespace

std::string_view wrapper_name(WrapperKind kind) {
  switch (kind) {
    case WrapperKind::kDdp: return "DDP";
    case WrapperKind::kFsdp: return "FSDP";
    case WrapperKind::kCompile: return "compile";
    case WrapperKind::kCheckpoint: return "checkpoint";
  }
  return "unknown";
}

Status FqnRules::declare_wrapper(std::string module_path, WrapperKind kind) {
  if (static_cast<int32_t>(kind) < 0 || static_cast<int32_t>(kind) > 3) {
    return make_error(Code::kInvalidArgument, "unknown wrapper kind {}", static_cast<int32_t>(kind));
  }
  auto [it, inserted] = wrappers_.emplace(normalize_path(std::move(module_path)), kind);
  if (!inserted && it->second != kind) {
    return make_error_at(Code::kInvalidArgument, it->first,
                         "module '{}' is already declared as a {} wrapper", it->first,
                         wrapper_name(it->second));
  }
  return ok();
}

Status FqnRules::add_modifier(std::string module_path, std::string segment, std::string child) {
  if (segment.empty() || child.empty() || child.find('.') != std::string::npos) {
    return make_error(Code::kInvalidArgument,
                      "an FQN modifier needs a segment and a child attribute name without dots");
  }
  collapsed_[normalize_path(std::move(module_path))].insert(std::move(child));
  return ok();
}

Result<CanonicalName> FqnRules::canonicalize(std::string_view raw_name) const {
  const std::string name = remove_all(raw_name, kCheckpointPrefix);
  const std::vector<std::string_view> tokens = split(name);
  CanonicalName out;
  std::string path;  // the raw module path walked so far
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string_view tok = tokens[i];
    if (tok.empty()) {
      return make_error_at(Code::kInvalidArgument, std::string(raw_name), "name '{}' has an empty segment",
                           raw_name);
    }
    const bool last = i + 1 == tokens.size();
    auto wrapper = wrappers_.find(path);
    if (wrapper != wrappers_.end() && !last) {
      const WrapperKind kind = wrapper->second;
      if (kind == WrapperKind::kDdp) {
        if (tok != "module") {
          return make_error_at(Code::kInvalidArgument, std::string(raw_name),
                               "name '{}': expected 'module' under the DDP wrapper at '{}', got '{}'",
                               raw_name, path, tok);
        }
        append(out.prefixed, tok);
        append(path, tok);
        continue;
      }
      if (kind == WrapperKind::kCompile && tok != "_orig_mod") {
        return make_error_at(Code::kInvalidArgument, std::string(raw_name),
                             "name '{}': expected '_orig_mod' under the compiled module at '{}', got '{}'",
                             raw_name, path, tok);
      }
    }
    if (tok == "_orig_mod" && !last) {
      append(out.prefixed, tok);
      append(path, tok);
      continue;
    }
    if (tok == "_fsdp_wrapped_module" && !last) {
      append(path, tok);
      continue;
    }
    if (tok == kExtraState && !last) {
      return make_error_at(Code::kInvalidArgument, std::string(raw_name),
                           "Expect `_extra_state` to be the last obj name (in '{}')", raw_name);
    }
    auto collapsed = collapsed_.find(path);
    const bool drop = !last && collapsed != collapsed_.end() && collapsed->second.contains(tok);
    if (!drop) {
      append(out.fqn, tok);
      append(out.prefixed, tok);
    }
    append(path, tok);
  }
  return out;
}

Result<std::string> FqnRules::canonical_module_path(std::string_view raw_path) const {
  if (raw_path.empty()) return std::string();
  // A module path canonicalizes like a name with one more segment below it.
  CanonicalName c = TRY(canonicalize(std::string(raw_path) + ".x"));
  if (c.fqn == "x") return std::string();
  return c.fqn.substr(0, c.fqn.size() - 2);
}

}  // namespace dsd

// Canonical FQNs: the name a parameter would have in the unwrapped model.
//
// A trainer registers raw names as its (possibly wrapped) module tree reports them, e.g.
// "module._orig_mod.layers.0._checkpoint_wrapped_module.attn.weight", and declares where the
// wrappers are. The canonical FQN strips, as PyTorch's _get_fqns does:
// - every "_checkpoint_wrapped_module." (activation checkpointing), anywhere;
// - the "_fsdp_wrapped_module" token (FSDP1) and the "_orig_mod" token (torch.compile),
//   wherever they appear (they are reserved attribute names of those wrappers);
// - the "module" token directly under a module declared as DDP;
// - the child segment of an FQN modifier (`_fqn_modifiers`): a child attribute a module
//   declares as collapsed into its own prefix (a state_dict hook renamed its keys).
// The result is a pure function of the name and the declarations, so get/set/get gives the
// same keys every time (PyTorch issue #158519 cannot happen).
#pragma once

#include <map>
#include <set>
#include <string>
#include <string_view>

#include "core/base/result.h"

namespace dsd {

enum class WrapperKind : int32_t {
  kDdp = 0,         // DistributedDataParallel: child "module"
  kFsdp = 1,        // FSDP1: child "_fsdp_wrapped_module"
  kCompile = 2,     // torch.compile's OptimizedModule: child "_orig_mod"
  kCheckpoint = 3,  // activation checkpointing: child "_checkpoint_wrapped_module"
};
std::string_view wrapper_name(WrapperKind kind);

struct CanonicalName {
  std::string fqn;       // canonical: every wrapper token removed
  std::string prefixed;  // keeps "module" (DDP) and "_orig_mod" (compile): what the wrapped
                         // module's own load_state_dict calls the key
};

class FqnRules {
 public:
  // `module_path` is a raw module path ("" for the root).
  Status declare_wrapper(std::string module_path, WrapperKind kind);
  // The module at `module_path` maps state-dict segment `segment` to its child attribute
  // `child`, whose own segment is therefore dropped from FQNs.
  Status add_modifier(std::string module_path, std::string segment, std::string child);

  // Canonicalizes a raw parameter/buffer/extra-state name. Errors when a declared wrapper's
  // child token is not the expected one, for empty segments, and for `_extra_state` that is
  // not the last segment.
  Result<CanonicalName> canonicalize(std::string_view raw_name) const;
  // Canonicalizes a raw module path (for submodule prefixes); "" stays "".
  Result<std::string> canonical_module_path(std::string_view raw_path) const;

  bool empty() const { return wrappers_.empty() && collapsed_.empty(); }

 private:
  std::map<std::string, WrapperKind, std::less<>> wrappers_;
  std::map<std::string, std::set<std::string, std::less<>>, std::less<>> collapsed_;  // path -> child attrs
};

}  // namespace dsd

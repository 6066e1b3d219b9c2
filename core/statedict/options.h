// StateDictOptions: PyTorch's eight fields, same names and defaults.
#pragma once

#include <cstdint>
#include <string>

namespace dsd {

struct StateDictOptions {
  // Get: gather every distributed tensor into a full tensor. Set: the input is a full state
  // dict, sliced into each rank's shards.
  bool full_state_dict = false;
  // Move tensors to CPU. With full_state_dict and a communicator of more than one rank, only
  // rank 0 receives content; other ranks get an empty state dict.
  bool cpu_offload = false;
  // Get only: leave out parameters with requires_grad = false (buffers are kept).
  bool ignore_frozen_params = false;
  // Deprecated, with submodule prefixes only: false strips the submodule's prefix.
  bool keep_submodule_prefixes = true;
  // Set: missing and unexpected keys are errors (as nn.Module.load_state_dict(strict=True)),
  // and so is a trainable parameter without saved optimizer state.
  bool strict = true;
  // Set: only rank 0 holds the full state dict; tensors are broadcast and sliced. Requires
  // full_state_dict.
  bool broadcast_from_rank0 = false;
  // Get: the flattened optimizer state dict (`state.<fqn>.<k>`, `param_groups.<fqn>.<k>`).
  // Set detects the format itself.
  bool flatten_optimizer_state_dict = false;
  // Name of the modules' method giving FQN modifiers (Python binding); the C registry takes
  // modifiers declared directly.
  std::string dsd_fqn_modifiers = "_fqn_modifiers";

  // dsd's own: bytes per collective bucket when gathering or broadcasting full state dicts
  // (0: the default, 64 MiB).
  uint64_t bucket_bytes = 0;
};

}  // namespace dsd

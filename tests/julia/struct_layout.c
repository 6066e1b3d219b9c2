/* Prints the C compiler's layout of every struct of dsd_decls.h, one line each:
 *   struct <name> <sizeof> <alignof>
 *   field <struct>.<field> <offsetof>
 * check_binding.py compares it with the layout that Julia gives the structs of
 * bindings/julia/src/LibDsd.jl (C alignment rules applied to their Julia field types), and
 * checks that every struct and field of the header is listed here. */
#include <stdalign.h>
#include <stddef.h>
#include <stdio.h>

#include "dsd/dsd.h"

#define STRUCT(T) printf("struct %s %zu %zu\n", #T, sizeof(T), alignof(T))
#define FIELD(T, f) printf("field %s.%s %zu\n", #T, #f, offsetof(T, f))

int main(void) {
  STRUCT(dsd_device);
  FIELD(dsd_device, type);
  FIELD(dsd_device, index);

  STRUCT(dsd_tensor);
  FIELD(dsd_tensor, bits);

  STRUCT(dsd_tensor_info);
  FIELD(dsd_tensor_info, dtype);
  FIELD(dsd_tensor_info, device);
  FIELD(dsd_tensor_info, ndim);
  FIELD(dsd_tensor_info, data);
  FIELD(dsd_tensor_info, numel);
  FIELD(dsd_tensor_info, nbytes);
  FIELD(dsd_tensor_info, read_only);
  FIELD(dsd_tensor_info, contiguous);

  STRUCT(dsd_comm_options);
  FIELD(dsd_comm_options, struct_size);
  FIELD(dsd_comm_options, reserved);
  FIELD(dsd_comm_options, timeout_ms);

  STRUCT(dsd_layout);
  FIELD(dsd_layout, bits);

  STRUCT(dsd_placement);
  FIELD(dsd_placement, kind);
  FIELD(dsd_placement, dim);

  STRUCT(dsd_state_dict_options);
  FIELD(dsd_state_dict_options, struct_size);
  FIELD(dsd_state_dict_options, full_state_dict);
  FIELD(dsd_state_dict_options, cpu_offload);
  FIELD(dsd_state_dict_options, ignore_frozen_params);
  FIELD(dsd_state_dict_options, keep_submodule_prefixes);
  FIELD(dsd_state_dict_options, strict);
  FIELD(dsd_state_dict_options, broadcast_from_rank0);
  FIELD(dsd_state_dict_options, flatten_optimizer_state_dict);
  FIELD(dsd_state_dict_options, dsd_fqn_modifiers);
  FIELD(dsd_state_dict_options, bucket_bytes);

  STRUCT(dsd_checkpoint_save_options);
  FIELD(dsd_checkpoint_save_options, struct_size);
  FIELD(dsd_checkpoint_save_options, overwrite);
  FIELD(dsd_checkpoint_save_options, thread_count);
  FIELD(dsd_checkpoint_save_options, save_to_lowest_rank);
  FIELD(dsd_checkpoint_save_options, sync_files);
  FIELD(dsd_checkpoint_save_options, block_size);
  FIELD(dsd_checkpoint_save_options, format);
  FIELD(dsd_checkpoint_save_options, enable_plan_caching);
  FIELD(dsd_checkpoint_save_options, max_staging_bytes);
  FIELD(dsd_checkpoint_save_options, base);
  FIELD(dsd_checkpoint_save_options, incremental);

  STRUCT(dsd_checkpoint_load_options);
  FIELD(dsd_checkpoint_load_options, struct_size);
  FIELD(dsd_checkpoint_load_options, strict);
  FIELD(dsd_checkpoint_load_options, thread_count);
  FIELD(dsd_checkpoint_load_options, verify);
  FIELD(dsd_checkpoint_load_options, allow_external_files);
  FIELD(dsd_checkpoint_load_options, cooperative_load);
  FIELD(dsd_checkpoint_load_options, cooperative_load_on_one_host);

  STRUCT(dsd_format_convert_options);
  FIELD(dsd_format_convert_options, struct_size);
  FIELD(dsd_format_convert_options, overwrite);
  FIELD(dsd_format_convert_options, thread_count);
  FIELD(dsd_format_convert_options, max_shard_size);
  FIELD(dsd_format_convert_options, select);
  FIELD(dsd_format_convert_options, strip_prefix);
  FIELD(dsd_format_convert_options, dtype);
  FIELD(dsd_format_convert_options, dequantize);
  FIELD(dsd_format_convert_options, materialize);

  STRUCT(dsd_checkpoint_gc_report);
  FIELD(dsd_checkpoint_gc_report, retired_removed);
  FIELD(dsd_checkpoint_gc_report, files_removed);
  FIELD(dsd_checkpoint_gc_report, bytes_removed);
  return 0;
}

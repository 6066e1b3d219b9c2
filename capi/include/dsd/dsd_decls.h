/* dsd: distributed state dicts and checkpoints, as PyTorch's torch.distributed.checkpoint.
 *
 * This file is the C ABI (version 1.0) and its specification. It holds only what Python's
 * cffi parses as it is (no #include, no #if, integer #defines only), so bindings load it
 * verbatim: C and C++ include <dsd/dsd.h>, which wraps it.
 *
 * Conventions, for every function below (each rule is tested in tests/abi):
 *
 * Names. Functions are dsd_<noun>_<verb> (the PyTorch state-dict functions keep PyTorch's
 *   names: dsd_get_model_state_dict, ...), types dsd_<noun>, constants DSD_<NOUN>_<NAME>.
 *   Enumerations are `typedef int32_t` plus #defines that are never renumbered, and 0 is
 *   never one of their values: a zeroed field is always recognisably unset.
 *
 * Arguments. Inputs first, then outputs, then `dsd_error** err`. Arrays are a pointer followed
 *   by its size_t length: `shape, ndim` for dimensions (int64_t each), `items, count` for
 *   anything else, `out, capacity` for a caller buffer. Ranks are int32_t. Outputs are named
 *   `out` (or `out_<what>` when there are several) and are written only on success: on
 *   failure there is nothing to clean up.
 *
 * Errors. A fallible function returns dsd_status (DSD_OK == 0) and takes `err` last. `err`
 *   may be NULL; otherwise `*err` must be NULL on entry (GLib's rule): a call that finds an
 *   error object there does nothing and returns DSD_E_INVALID_ARGUMENT, leaving that object
 *   alone. On failure *err receives a new error object (code, message naming the key, tensor
 *   or file, and that key or file as context) that the caller frees with dsd_error_free();
 *   on success *err stays NULL. Nothing ever throws, an allocation failure included.
 *   Every fallible function may return DSD_E_INVALID_ARGUMENT (a NULL required pointer, a
 *   non-NULL *err), DSD_E_OUT_OF_MEMORY and DSD_E_INTERNAL; the "Returns" line of each
 *   function lists the other codes it returns ("the common codes" when there are none).
 *
 * Strings. Strings passed in are NUL-terminated UTF-8 and copied if kept. Strings handed
 *   out are `const char**` pointers borrowed from an object the call was given (named in
 *   the function's comment), valid until that object is freed (for keys and values of a
 *   state dict: or modified). No function truncates a string or writes one into a caller
 *   buffer.
 *
 * Lifetimes. Three kinds of objects, each with one vocabulary:
 * - Value handles (dsd_tensor, dsd_layout): `{uint64_t bits}` structs, copied freely;
 *   dsd_<x>_retain() gives a new handle, dsd_<x>_release() releases one, each handle
 *   exactly once. They are checked on every use: a released, double-released, forged,
 *   zeroed or wrong-kind handle is an error code (DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND),
 *   never undefined behaviour.
 * - Reference-counted roots (dsd_comm, dsd_mesh, dsd_state_dict): opaque pointers created
 *   with one reference; dsd_<x>_retain() adds one (and returns its argument),
 *   dsd_<x>_release() drops one; the last release frees the object. Objects that keep
 *   another (a mesh its communicator, a state dict its tensors) hold their own reference.
 * - Single-owner roots (dsd_error, dsd_model, dsd_optim, dsd_incompatible_keys, dsd_future,
 *   dsd_async_checkpointer, dsd_checkpoint_manager): opaque pointers freed once with
 *   dsd_<x>_free().
 *   Releasing or freeing NULL is a no-op. Using a root pointer after its last release or
 *   free is undefined behaviour (as any C pointer); only value handles are checked.
 *
 * Option structs. Each starts with `uint32_t struct_size` and has dsd_<x>_options_init(),
 *   which sets the defaults and struct_size (macros do not reach cffi, cgo or Julia). Every
 *   function reads them by one rule: NULL means the defaults; a struct_size of a known
 *   (current or earlier) version of the struct is read, fields it does not reach keeping
 *   their defaults; a larger struct_size (a newer header) is accepted when the bytes this
 *   library does not know are all zero, and refused with DSD_E_UNSUPPORTED otherwise; any
 *   other struct_size is DSD_E_INVALID_ARGUMENT. New behaviour is a new field or a new
 *   function (_v2), never a changed signature.
 *
 * Threads. A function whose object arguments are all `const` may run concurrently with any
 *   other such call on the same objects (as Rust's &T). Calls that modify an object (the
 *   non-const ones) need external serialisation against every other call on that object.
 *   Functions on distinct objects may always run concurrently; the handle tables are
 *   shared safely (lookups take no global lock). Collective functions (those taking a
 *   communicator, directly or through a model or manager) are called by every rank in the
 *   same order, from one thread per communicator at a time. Callbacks run on the calling
 *   thread unless their comment says otherwise.
 */

/* ============================================================================================
 * Versions
 * ========================================================================================== */

/* The ABI this header describes: bindings compare it with dsd_abi_version() and refuse a
 * library of another major version. The major version is also the soname's. */
#define DSD_ABI_VERSION_MAJOR 1
#define DSD_ABI_VERSION_MINOR 2

/* (major << 16) | minor of the loaded library. Any thread. */
uint32_t dsd_abi_version(void);

/* The library's semantic version, e.g. "0.3.0". Static storage. Any thread. */
const char* dsd_version_string(void);

/* ============================================================================================
 * Status codes and errors
 * ========================================================================================== */

typedef int32_t dsd_status;
#define DSD_OK 0
#define DSD_E_INVALID_ARGUMENT 1  /* a NULL pointer, a bad option, a malformed argument */
#define DSD_E_STALE_HANDLE 2      /* a released, double-released, forged or zeroed handle */
#define DSD_E_WRONG_KIND 3        /* a handle or value of another kind than asked for */
#define DSD_E_NOT_FOUND 4         /* a missing key, file or entry */
#define DSD_E_UNEXPECTED_KEY 5    /* a key the target does not have */
#define DSD_E_DTYPE_MISMATCH 6    /* wrong or unknown dtype */
#define DSD_E_SHAPE_MISMATCH 7    /* wrong shape or size */
#define DSD_E_DEVICE 8            /* unsupported or mixed devices */
#define DSD_E_IO 9                /* the file system failed */
#define DSD_E_CORRUPT 10          /* a checksum, header or bound in a file is wrong */
#define DSD_E_EXISTS 11           /* refusing to overwrite */
#define DSD_E_COMM 12             /* a collective failed or a peer rank died */
#define DSD_E_TIMEOUT 13          /* a wait ran past its limit */
#define DSD_E_NO_SPACE 14         /* disk full or file size limit reached */
#define DSD_E_UNSUPPORTED 15      /* a valid request this build cannot serve */
#define DSD_E_OUT_OF_MEMORY 16    /* an allocation failed */
#define DSD_E_INTERNAL 17         /* a bug in dsd or an unexpected library failure */
#define DSD_E_BUFFER_TOO_SMALL 18 /* the caller's buffer is too small; call again larger */
#define DSD_E_ABI_MISMATCH 19     /* a binding and the library disagree on the ABI */
#define DSD_E_STATE 20            /* the object is not in a state that allows the call */
#define DSD_E_CALLBACK 21         /* a callback supplied by the caller reported failure */
#define DSD_E_READ_ONLY 22        /* writing into a tensor imported as read-only */

typedef struct dsd_error dsd_error;

/* The error's status code (DSD_E_INVALID_ARGUMENT for NULL). Any thread. */
dsd_status dsd_error_code(const dsd_error* error);

/* The error's message: one sentence naming the key, tensor or file concerned. Borrowed from
 * `error`, valid until dsd_error_free(). Never NULL ("" for a NULL error). */
const char* dsd_error_message(const dsd_error* error);

/* The key or file the error is about, or "" when there is none. Borrowed like the message. */
const char* dsd_error_context(const dsd_error* error);

/* Frees an error object. NULL is a no-op. */
void dsd_error_free(dsd_error* error);

/* The message of the last error raised on the calling OS thread, or "" if none. A
 * convenience only: Go goroutines and Julia tasks move between threads, so prefer `err`.
 * Valid until the next failing dsd call on this thread. */
const char* dsd_error_last_message(void);

/* A short stable name for a status code ("ok", "not_found", ...); "unknown" otherwise.
 * Static storage. */
const char* dsd_status_name(dsd_status status);

/* ============================================================================================
 * Element types and devices
 * ========================================================================================== */

typedef int32_t dsd_dtype;
#define DSD_DTYPE_BOOL 1
#define DSD_DTYPE_U8 2
#define DSD_DTYPE_I8 3
#define DSD_DTYPE_I16 4
#define DSD_DTYPE_I32 5
#define DSD_DTYPE_I64 6
#define DSD_DTYPE_F16 7
#define DSD_DTYPE_BF16 8
#define DSD_DTYPE_F32 9
#define DSD_DTYPE_F64 10
#define DSD_DTYPE_C64 11
#define DSD_DTYPE_C128 12
#define DSD_DTYPE_F8_E4M3FN 13
#define DSD_DTYPE_F8_E5M2 14
#define DSD_DTYPE_U16 15
#define DSD_DTYPE_U32 16
#define DSD_DTYPE_U64 17

/* Bytes per element of a dtype; 0 for an unknown code. */
size_t dsd_dtype_size(dsd_dtype dtype);

/* PyTorch's name of a dtype without "torch." ("float32", "bfloat16"); NULL for an unknown
 * code. Static storage. */
const char* dsd_dtype_name(dsd_dtype dtype);

/* Device types use DLPack's numbers (kDLCPU, kDLCUDA). */
typedef int32_t dsd_device_type;
#define DSD_DEVICE_CPU 1
#define DSD_DEVICE_CUDA 2

typedef struct dsd_device {
  dsd_device_type type; /* DSD_DEVICE_* */
  int32_t index;        /* device ordinal; 0 for the CPU */
} dsd_device;

/* ============================================================================================
 * Tensors
 *
 * A dsd_tensor names a tensor dsd refers to without copying it: memory imported by DLPack
 * (whose deleter dsd calls exactly once, when the last reference is gone) or memory the
 * caller describes by pointer. Handles are values (see Lifetimes): release each handle
 * returned to you exactly once with dsd_tensor_release(). State dicts and models keep their
 * own references, so releasing a handle after handing it to them is safe.
 *
 * DLPack structs are the ones of <dlpack/dlpack.h> (v0 and v1); this header only names
 * them. In Python pass the capsule's pointer.
 * ========================================================================================== */

typedef struct dsd_tensor {
  uint64_t bits; /* kind, generation and slot; 0 is never a valid handle */
} dsd_tensor;

struct DLManagedTensor;
struct DLManagedTensorVersioned;

/* Imports a DLPack v0 tensor (the legacy "dltensor" capsule payload). Takes ownership of
 * `src` in every case: on failure its deleter has already been called. CPU and CUDA
 * memory; CUDA needs a libtorch built with CUDA.
 * Returns DSD_E_DTYPE_MISMATCH (a dtype dsd has no code for), DSD_E_DEVICE (another device
 * type, or CUDA in a CPU build), DSD_E_UNSUPPORTED (negative strides, a byte offset that is
 * not a multiple of the element size). */
dsd_status dsd_tensor_from_dlpack(struct DLManagedTensor* src, dsd_tensor* out, dsd_error** err);

/* Imports a DLPack v1 tensor (what __dlpack__(max_version=(1, 0)) gives). As above; the
 * read-only flag is kept and dsd never writes into such a tensor (DSD_E_READ_ONLY).
 * Returns the codes of dsd_tensor_from_dlpack(), and DSD_E_UNSUPPORTED for a major version
 * other than 1. */
dsd_status dsd_tensor_from_dlpack_versioned(struct DLManagedTensorVersioned* src, dsd_tensor* out,
                                            dsd_error** err);

/* Called once with `user_data` when dsd no longer refers to memory the caller lent it. May
 * run on any thread that drops the last reference. */
typedef void (*dsd_release_fn)(void* user_data);

/* Wraps memory the caller owns: `ndim` dimensions of `shape`, `strides` in elements (NULL:
 * contiguous row-major; otherwise `ndim` of them), elements of `dtype` on `device`. Borrows
 * `data`; `release` (may be NULL) is called once with `user_data` when dsd lets go of it,
 * also if this call fails. Without `release` the caller keeps the memory alive while any
 * dsd object refers to it.
 * Returns DSD_E_INVALID_ARGUMENT (NULL data with elements, NULL shape with ndim > 0, ndim
 * > 64), DSD_E_SHAPE_MISMATCH (a negative size), DSD_E_DTYPE_MISMATCH (unknown dtype),
 * DSD_E_DEVICE (an unknown device type, CUDA in a CPU build), DSD_E_UNSUPPORTED (negative
 * strides). */
dsd_status dsd_tensor_from_blob(void* data, dsd_dtype dtype, const int64_t* shape, size_t ndim,
                                const int64_t* strides, dsd_device device, bool read_only,
                                dsd_release_fn release, void* user_data, dsd_tensor* out,
                                dsd_error** err);

/* Exports a tensor as DLPack v0 / v1, without copying. The caller owns *out and calls its
 * deleter (or dsd_dlpack_free) when done; the data stays valid until then, even after the
 * handle is released. The v1 export carries the read-only flag.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND. */
dsd_status dsd_tensor_to_dlpack(dsd_tensor tensor, struct DLManagedTensor** out, dsd_error** err);
dsd_status dsd_tensor_to_dlpack_versioned(dsd_tensor tensor, struct DLManagedTensorVersioned** out,
                                          dsd_error** err);

/* Calls a DLPack tensor's deleter (for C callers without <dlpack/dlpack.h>, and bindings).
 * NULL is a no-op. */
void dsd_dlpack_free(struct DLManagedTensor* tensor);
void dsd_dlpack_versioned_free(struct DLManagedTensorVersioned* tensor);

/* A new handle to the same tensor, released separately.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND. */
dsd_status dsd_tensor_retain(dsd_tensor tensor, dsd_tensor* out, dsd_error** err);

/* Releases a handle. The tensor lives on while a state dict, model or DLPack export still
 * refers to it.
 * Returns DSD_E_STALE_HANDLE (a released, forged or zeroed handle), DSD_E_WRONG_KIND (a
 * handle that is not a tensor's). */
dsd_status dsd_tensor_release(dsd_tensor tensor, dsd_error** err);

typedef struct dsd_tensor_info {
  dsd_dtype dtype;
  dsd_device device;
  size_t ndim;
  void* data;     /* address of the first element (NULL for an empty tensor) */
  int64_t numel;
  size_t nbytes;  /* numel * element size */
  bool read_only;
  bool contiguous;
} dsd_tensor_info;

/* Describes a tensor.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND. */
dsd_status dsd_tensor_info_get(dsd_tensor tensor, dsd_tensor_info* out, dsd_error** err);

/* Copies the shape (strides, in elements) into `out[0..ndim)`.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND, DSD_E_BUFFER_TOO_SMALL (`capacity` < ndim). */
dsd_status dsd_tensor_shape(dsd_tensor tensor, int64_t* out, size_t capacity, dsd_error** err);
dsd_status dsd_tensor_strides(dsd_tensor tensor, int64_t* out, size_t capacity, dsd_error** err);

/* ============================================================================================
 * State dicts
 *
 * A dsd_state_dict is a reference-counted reference to a container of a state-dict tree: an
 * ordered dict with string keys (a state dict, or a nested dict in one) or a list (a tuple
 * when created as one). Values are None, bool, int64, double, string, bytes, tensor, or
 * another container. Containers are shared by reference, as in Python:
 * dsd_state_dict_get_child() returns a new reference to the same nested container, and
 * dsd_state_dict_set_child() stores a reference. Every reference handed to you is released
 * with dsd_state_dict_release().
 *
 * Writing: on a dict, `key` names the entry (replaced in place if present, else appended);
 * on a list, `key` must be NULL and the value is appended.
 * Reading: by position `index` in [0, size), in insertion order, for dicts and lists;
 * dsd_state_dict_find() gives the position of a dict key.
 * ========================================================================================== */

typedef struct dsd_state_dict dsd_state_dict;

typedef int32_t dsd_kind;
#define DSD_KIND_NONE 1
#define DSD_KIND_BOOL 2
#define DSD_KIND_INT 3
#define DSD_KIND_DOUBLE 4
#define DSD_KIND_STRING 5
#define DSD_KIND_BYTES 6
#define DSD_KIND_TENSOR 7
#define DSD_KIND_LIST 8
#define DSD_KIND_DICT 9

/* A new empty dict / list (a tuple if `is_tuple`, which only matters to Python).
 * Returns the common codes. */
dsd_status dsd_state_dict_new(dsd_state_dict** out, dsd_error** err);
dsd_status dsd_state_dict_new_list(bool is_tuple, dsd_state_dict** out, dsd_error** err);

/* Adds a reference to `sd` and returns it (NULL for NULL). Any thread. */
dsd_state_dict* dsd_state_dict_retain(dsd_state_dict* sd);

/* Drops a reference; the container lives on while other references (or containers holding
 * it) remain. NULL is a no-op. */
void dsd_state_dict_release(dsd_state_dict* sd);

/* DSD_KIND_DICT or DSD_KIND_LIST, and whether the list is a tuple (`out_is_tuple` may be
 * NULL). Returns the common codes. */
dsd_status dsd_state_dict_container_kind(const dsd_state_dict* sd, dsd_kind* out_kind,
                                         bool* out_is_tuple, dsd_error** err);

/* Int-keyed dicts: keys stand for integers, as in PyTorch's positional optimizer state
 * `{"state": {0: {...}}}`. Keys stay decimal strings in the C ABI ("0", "-3"); the flag says
 * they were ints, so Python gets ints back.
 * Returns DSD_E_WRONG_KIND (a list), DSD_E_INVALID_ARGUMENT (setting the flag on a dict
 * holding a key that is not a decimal int64). */
dsd_status dsd_state_dict_int_keys(const dsd_state_dict* sd, bool* out, dsd_error** err);
dsd_status dsd_state_dict_set_int_keys(dsd_state_dict* sd, bool int_keys, dsd_error** err);

/* Number of entries. Returns the common codes. */
dsd_status dsd_state_dict_size(const dsd_state_dict* sd, size_t* out, dsd_error** err);

/* Position of `key` in a dict.
 * Returns DSD_E_NOT_FOUND (absent; the message names the key), DSD_E_WRONG_KIND (a list). */
dsd_status dsd_state_dict_find(const dsd_state_dict* sd, const char* key, size_t* out,
                               dsd_error** err);

/* The key at a position of a dict, borrowed from `sd`.
 * Returns DSD_E_INVALID_ARGUMENT (index out of range), DSD_E_WRONG_KIND (a list). */
dsd_status dsd_state_dict_key(const dsd_state_dict* sd, size_t index, const char** out,
                              dsd_error** err);

/* The kind of the value at a position.
 * Returns DSD_E_INVALID_ARGUMENT (index out of range). */
dsd_status dsd_state_dict_kind(const dsd_state_dict* sd, size_t index, dsd_kind* out,
                               dsd_error** err);

/* Readers by position. get_string/get_bytes: a pointer and length borrowed from `sd`
 * (strings are NUL-terminated too). get_tensor: a new handle, which the caller releases.
 * get_child: a new container reference, which the caller releases.
 * Returns DSD_E_WRONG_KIND (a value of another kind: an int is not read as a double),
 * DSD_E_INVALID_ARGUMENT (index out of range). */
dsd_status dsd_state_dict_get_bool(const dsd_state_dict* sd, size_t index, bool* out,
                                   dsd_error** err);
dsd_status dsd_state_dict_get_int(const dsd_state_dict* sd, size_t index, int64_t* out,
                                  dsd_error** err);
dsd_status dsd_state_dict_get_double(const dsd_state_dict* sd, size_t index, double* out,
                                     dsd_error** err);
dsd_status dsd_state_dict_get_string(const dsd_state_dict* sd, size_t index, const char** out_data,
                                     size_t* out_len, dsd_error** err);
dsd_status dsd_state_dict_get_bytes(const dsd_state_dict* sd, size_t index, const void** out_data,
                                    size_t* out_len, dsd_error** err);
dsd_status dsd_state_dict_get_tensor(const dsd_state_dict* sd, size_t index, dsd_tensor* out,
                                     dsd_error** err);
dsd_status dsd_state_dict_get_child(const dsd_state_dict* sd, size_t index, dsd_state_dict** out,
                                    dsd_error** err);

/* Writers (see the section comment for `key`). set_tensor keeps its own reference: the
 * caller still releases `tensor`. set_child stores a reference to `child` (the caller still
 * releases its own).
 * Returns DSD_E_INVALID_ARGUMENT (a NULL key on a dict, a key on a list, a key that is not a
 * decimal int64 in an int-keyed dict, a container stored inside itself), DSD_E_STALE_HANDLE
 * and DSD_E_WRONG_KIND (set_tensor with a bad handle). */
dsd_status dsd_state_dict_set_none(dsd_state_dict* sd, const char* key, dsd_error** err);
dsd_status dsd_state_dict_set_bool(dsd_state_dict* sd, const char* key, bool value,
                                   dsd_error** err);
dsd_status dsd_state_dict_set_int(dsd_state_dict* sd, const char* key, int64_t value,
                                  dsd_error** err);
dsd_status dsd_state_dict_set_double(dsd_state_dict* sd, const char* key, double value,
                                     dsd_error** err);
dsd_status dsd_state_dict_set_string(dsd_state_dict* sd, const char* key, const char* data,
                                     size_t len, dsd_error** err);
dsd_status dsd_state_dict_set_bytes(dsd_state_dict* sd, const char* key, const void* data,
                                    size_t len, dsd_error** err);
dsd_status dsd_state_dict_set_tensor(dsd_state_dict* sd, const char* key, dsd_tensor tensor,
                                     dsd_error** err);
dsd_status dsd_state_dict_set_child(dsd_state_dict* sd, const char* key, dsd_state_dict* child,
                                    dsd_error** err);

/* Removes the entry at a position.
 * Returns DSD_E_INVALID_ARGUMENT (index out of range). */
dsd_status dsd_state_dict_remove(dsd_state_dict* sd, size_t index, dsd_error** err);

/* Flattens nested containers to dot-joined keys as PyTorch DCP does ("state.l.weight.step";
 * list indices as numbers; lists without tensors and tuples stay whole). *out_flat is a new
 * dict of leaves; *out_mapping a new dict from each flat key to its path, a list of strings
 * (dict keys) and ints (list indices). The caller releases both.
 * Returns DSD_E_INVALID_ARGUMENT ("duplicated flatten key ..." when two paths join to one
 * key), DSD_E_WRONG_KIND (a list at the top). */
dsd_status dsd_state_dict_flatten(const dsd_state_dict* sd, dsd_state_dict** out_flat,
                                  dsd_state_dict** out_mapping, dsd_error** err);

/* The inverse: nests `flat` along the paths in `mapping` (a key without a mapping stays at
 * the top), creating dicts and lists, padding lists with None.
 * Returns DSD_E_INVALID_ARGUMENT (a malformed path), DSD_E_WRONG_KIND (a list given). */
dsd_status dsd_state_dict_unflatten(const dsd_state_dict* flat, const dsd_state_dict* mapping,
                                    dsd_state_dict** out, dsd_error** err);

/* Whether two trees are equal: same keys in the same order, equal scalars, tensors of equal
 * dtype, shape and bytes. When they differ, *out_why (may be NULL) receives a description of
 * the first difference, borrowed from `a` (valid until `a` is released); "" when equal.
 * Returns the common codes. */
dsd_status dsd_state_dict_equal(const dsd_state_dict* a, const dsd_state_dict* b, bool* out_equal,
                                const char** out_why, dsd_error** err);

/* ============================================================================================
 * Communicators, device meshes and layouts
 *
 * A dsd_comm is how the ranks of a job talk: Gloo process groups (CPU tensors, through
 * libtorch's c10d) built from the launcher's environment or a file store, or a caller-owned
 * NCCL communicator. A dsd_mesh arranges the ranks in an N-d array, as PyTorch's DeviceMesh.
 * A dsd_layout says how a distributed tensor (PyTorch's DTensor) is split: its global shape
 * and either one placement per mesh dimension (Shard(dim), with torch.chunk semantics so
 * uneven and empty shards are allowed, or Replicate) or an explicit chunk this rank holds.
 *
 * dsd_comm and dsd_mesh are reference-counted roots (a mesh keeps its communicator alive, a
 * layout its mesh, so each may be released as soon as the caller is done with it). Layouts
 * are value handles like dsd_tensor.
 *
 * Collective calls (constructors of communicators, dsd_comm_barrier) are made by every rank,
 * in the same order. A communicator is used by one thread at a time. A peer that dies or
 * stops calling makes the collective fail with DSD_E_COMM or DSD_E_TIMEOUT on every rank
 * that waits for it, within the communicator's timeout: never a hang. After such a failure
 * the communicator is broken and every later collective fails with the first error.
 * ========================================================================================== */

typedef struct dsd_comm dsd_comm;

typedef struct dsd_comm_options {
  uint32_t struct_size; /* sizeof(dsd_comm_options), as dsd_comm_options_init() sets it */
  uint32_t reserved;    /* 0 */
  int64_t timeout_ms;   /* how long a rendezvous or a collective may wait for its peers
                         * before failing with DSD_E_TIMEOUT; default 1800000 (30 min, as
                         * PyTorch's Gloo) */
} dsd_comm_options;

/* Fills `options` with the defaults and its struct_size. NULL is a no-op. */
void dsd_comm_options_init(dsd_comm_options* options);

/* A Gloo communicator from the launcher's environment. Collective over the launch. `options`
 * may be NULL (defaults). Read, first match wins:
 *   torchrun, dsdrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (rank 0 hosts the
 *     store, or torchrun's agent does when TORCHELASTIC_USE_AGENT_STORE=True);
 *   mpirun (OpenMPI): OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK,
 *     MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500);
 *   srun (Slurm): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, MASTER_ADDR (default: first host
 *     of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST), MASTER_PORT (default 15000 +
 *     SLURM_JOB_ID % 10000).
 * The store is a multi-tenant c10d TCPStore shared with torch.distributed in the same
 * process; dsd's keys live under "dsd/". Release with dsd_comm_release().
 * Returns DSD_E_INVALID_ARGUMENT (a variable missing or malformed, named in the message),
 * DSD_E_UNSUPPORTED (unknown option bytes; a build without Gloo), DSD_E_TIMEOUT (a rank or
 * the store did not come within the timeout; the message names the missing ranks),
 * DSD_E_COMM (the store could not be hosted or reached, connections failed). */
dsd_status dsd_comm_new_from_env(const dsd_comm_options* options, dsd_comm** out, dsd_error** err);

/* A Gloo communicator whose rendezvous goes through the file `path` (every rank passes the
 * same path, on a file system they share; the file must not hold keys of an earlier run).
 * Collective.
 * Returns the codes of dsd_comm_new_from_env(), and DSD_E_INVALID_ARGUMENT when `rank` is not
 * in [0, size). */
dsd_status dsd_comm_new_file_store(const char* path, int32_t rank, int32_t size,
                                   const dsd_comm_options* options, dsd_comm** out,
                                   dsd_error** err);

/* A communicator over a caller-owned NCCL communicator (`nccl_comm`, an ncclComm_t) and CUDA
 * stream (`cuda_stream`, a cudaStream_t; NULL is the default stream). Borrows both: they must
 * outlive the dsd_comm and everything that refers to it (meshes, layouts, state dicts), and
 * the caller runs nothing else on them concurrently. `rank` and `size` must be the NCCL
 * communicator's own. Tensors given to its collectives must be contiguous CUDA tensors on the
 * communicator's device. After a DSD_E_TIMEOUT the NCCL communicator itself may be stuck:
 * the caller should ncclCommAbort() it. Not collective (the NCCL communicator exists).
 * Returns DSD_E_UNSUPPORTED (a build without NCCL; unknown option bytes),
 * DSD_E_INVALID_ARGUMENT (a rank or size that disagrees with the NCCL communicator),
 * DSD_E_COMM (NCCL cannot be queried). */
dsd_status dsd_comm_new_nccl(void* nccl_comm, void* cuda_stream, int32_t rank, int32_t size,
                             const dsd_comm_options* options, dsd_comm** out, dsd_error** err);

/* A communicator of a single rank (rank 0 of 1): every collective is local. For single-process
 * programs and tests. Returns the common codes. */
dsd_status dsd_comm_new_local(dsd_comm** out, dsd_error** err);

/* Adds a reference and returns `comm` (NULL for NULL). Any thread. */
dsd_comm* dsd_comm_retain(dsd_comm* comm);

/* Drops a reference; the communicator lives on while meshes, layouts, state dicts, models,
 * checkpointers or managers refer to it. Not collective. NULL is a no-op. */
void dsd_comm_release(dsd_comm* comm);

/* This process's rank, and the number of ranks. Returns the common codes. */
dsd_status dsd_comm_rank(const dsd_comm* comm, int32_t* out, dsd_error** err);
dsd_status dsd_comm_size(const dsd_comm* comm, int32_t* out, dsd_error** err);

/* What the communicator runs over: "gloo", "nccl" or "local", borrowed from `comm`.
 * Returns the common codes. */
dsd_status dsd_comm_backend(const dsd_comm* comm, const char** out, dsd_error** err);

/* Returns once every rank has called it. Collective.
 * Returns DSD_E_COMM or DSD_E_TIMEOUT (a peer died or did not come within the timeout; the
 * message names this rank and the cause). */
dsd_status dsd_comm_barrier(dsd_comm* comm, dsd_error** err);

typedef struct dsd_mesh dsd_mesh;

/* A device mesh of `ndim` dimensions of sizes `shape`, over the ranks of `comm`. `ranks`
 * lists the global rank at each position in row-major order (`count` = the product of the
 * sizes), as PyTorch's `DeviceMesh.mesh.flatten()`; NULL with count 0 means 0, 1, 2, ...
 * A rank may create a mesh it is not part of. `device_type` is the device type of the
 * mesh's tensors, as DeviceMesh's device_type. Keeps a reference to `comm`. Not collective.
 * Release with dsd_mesh_release().
 * Returns DSD_E_INVALID_ARGUMENT (ndim 0 or > 64, a non-positive size, a rank outside the world or
 * listed twice, a rank count that differs from the shape's product, an unknown device
 * type). */
dsd_status dsd_mesh_new(dsd_comm* comm, const int64_t* shape, size_t ndim, const int32_t* ranks,
                        size_t count, dsd_device_type device_type, dsd_mesh** out,
                        dsd_error** err);

/* Adds a reference and returns `mesh` (NULL for NULL). Any thread. */
dsd_mesh* dsd_mesh_retain(dsd_mesh* mesh);

/* Drops a reference. NULL is a no-op. */
void dsd_mesh_release(dsd_mesh* mesh);

/* The number of dimensions; the sizes (`capacity` >= ndim); the ranks in row-major order
 * (`capacity` >= the product of the sizes); the device type.
 * Returns DSD_E_BUFFER_TOO_SMALL (shape, ranks: the capacity is short). */
dsd_status dsd_mesh_ndim(const dsd_mesh* mesh, size_t* out, dsd_error** err);
dsd_status dsd_mesh_shape(const dsd_mesh* mesh, int64_t* out, size_t capacity, dsd_error** err);
dsd_status dsd_mesh_ranks(const dsd_mesh* mesh, int32_t* out, size_t capacity, dsd_error** err);
dsd_status dsd_mesh_device_type(const dsd_mesh* mesh, dsd_device_type* out, dsd_error** err);

/* Whether this process is part of the mesh (*out_in_mesh) and, if so, its coordinate in
 * `out_coordinate[0..ndim)` (left alone otherwise).
 * Returns DSD_E_BUFFER_TOO_SMALL (`capacity` < ndim). */
dsd_status dsd_mesh_coordinate(const dsd_mesh* mesh, bool* out_in_mesh, int64_t* out_coordinate,
                               size_t capacity, dsd_error** err);

typedef struct dsd_layout {
  uint64_t bits; /* kind, generation and slot; 0 is never a valid handle */
} dsd_layout;

typedef int32_t dsd_placement_kind;
#define DSD_PLACEMENT_REPLICATE 1
#define DSD_PLACEMENT_SHARD 2

/* One mesh dimension's placement: Replicate(), or Shard(dim) of the tensor dimension `dim`
 * (ignored for Replicate). */
typedef struct dsd_placement {
  dsd_placement_kind kind; /* DSD_PLACEMENT_* */
  int32_t dim;
} dsd_placement;

/* A layout of a tensor of global shape `global_shape[0..ndim)` with `placements[0..count)`,
 * one per mesh dimension, applied left to right as PyTorch does (two Shard on one tensor
 * dimension split it twice). `global_shape` may be NULL when ndim is 0. Release with
 * dsd_layout_release().
 * Returns DSD_E_INVALID_ARGUMENT (count differs from the mesh's ndim, an unknown kind, a Shard
 * dim outside the tensor, ndim > 64), DSD_E_SHAPE_MISMATCH (a negative size). */
dsd_status dsd_layout_new_placements(const dsd_mesh* mesh, const int64_t* global_shape, size_t ndim,
                                     const dsd_placement* placements, size_t count,
                                     dsd_layout* out, dsd_error** err);

/* A layout for custom sharding: this rank holds the box `offsets[0..ndim)`, `sizes[0..ndim)`
 * of the global tensor; other ranks pass their own box. `mesh` names the ranks that hold
 * pieces.
 * Returns DSD_E_SHAPE_MISMATCH (the box leaves the global shape, or a negative size),
 * DSD_E_INVALID_ARGUMENT (ndim > 64). */
dsd_status dsd_layout_new_chunk(const dsd_mesh* mesh, const int64_t* global_shape, size_t ndim,
                                const int64_t* offsets, const int64_t* sizes, dsd_layout* out,
                                dsd_error** err);

/* A new handle to the same layout, released separately.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND. */
dsd_status dsd_layout_retain(dsd_layout layout, dsd_layout* out, dsd_error** err);

/* Releases a handle; the layout lives on while a state dict refers to it.
 * Returns DSD_E_STALE_HANDLE (a released, forged or zeroed handle), DSD_E_WRONG_KIND (a
 * handle that is not a layout's). */
dsd_status dsd_layout_release(dsd_layout layout, dsd_error** err);

/* The tensor's number of dimensions, and its global shape.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND, DSD_E_BUFFER_TOO_SMALL (`capacity` < ndim). */
dsd_status dsd_layout_ndim(dsd_layout layout, size_t* out, dsd_error** err);
dsd_status dsd_layout_global_shape(dsd_layout layout, int64_t* out, size_t capacity,
                                   dsd_error** err);

/* The box this rank holds: `out_offsets` and `out_sizes` each receive ndim values
 * (`capacity` >= ndim). Equal to PyTorch's compute_local_shape_and_global_offset, except for
 * a rank that is not part of the mesh: it holds nothing, and gets all sizes and offsets 0.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND, DSD_E_BUFFER_TOO_SMALL. */
dsd_status dsd_layout_local_chunk(dsd_layout layout, int64_t* out_offsets, int64_t* out_sizes,
                                  size_t capacity, dsd_error** err);

/* Whether the layout is an explicit chunk (dsd_layout_new_chunk) rather than placements.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND. */
dsd_status dsd_layout_is_chunk(dsd_layout layout, bool* out, dsd_error** err);

/* The placements, one per mesh dimension (`capacity` >= the mesh's ndim).
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND (also for an explicit-chunk layout),
 * DSD_E_BUFFER_TOO_SMALL. */
dsd_status dsd_layout_placements(dsd_layout layout, dsd_placement* out, size_t capacity,
                                 dsd_error** err);

/* The layout's mesh: a new reference, released with dsd_mesh_release().
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND. */
dsd_status dsd_layout_mesh(dsd_layout layout, dsd_mesh** out, dsd_error** err);

/* A distributed tensor handle: this rank's `local` tensor with its `layout`. The local
 * tensor's shape must equal the layout's local chunk sizes (a rank outside the mesh passes a
 * tensor with no elements). Models and optimizers take such handles for sharded parameters
 * and their state; the new handle is released with dsd_tensor_release(), and the caller
 * still releases `local` and `layout`.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND, DSD_E_SHAPE_MISMATCH (naming both shapes). */
dsd_status dsd_tensor_new_dist(dsd_tensor local, dsd_layout layout, dsd_tensor* out,
                               dsd_error** err);

/* A new handle to the layout of a distributed tensor handle.
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND (also for a plain tensor). */
dsd_status dsd_tensor_layout(dsd_tensor tensor, dsd_layout* out, dsd_error** err);

/* Distributed tensors in state dicts (the state-dict functions above see them as tensors of
 * kind DSD_KIND_TENSOR whose handle is this rank's local tensor).
 *
 * set_dist_tensor stores this rank's `local` tensor with its `layout` under `key` (as
 * dsd_state_dict_set_tensor: NULL key appends to a list), checked as dsd_tensor_new_dist
 * checks it; the state dict keeps its own references, the caller still releases both.
 * get_layout gives a new handle to the layout of the value at `index`, which the caller
 * releases. is_dist_tensor tells whether the value at `index` is a distributed tensor
 * (false for plain tensors and non-tensors).
 * Returns DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND (get_layout of a plain tensor or a
 * non-tensor), DSD_E_SHAPE_MISMATCH (set_dist_tensor; naming the key and both shapes),
 * DSD_E_INVALID_ARGUMENT (index out of range; a key as for the writers). */
dsd_status dsd_state_dict_set_dist_tensor(dsd_state_dict* sd, const char* key, dsd_tensor local,
                                          dsd_layout layout, dsd_error** err);
dsd_status dsd_state_dict_get_layout(const dsd_state_dict* sd, size_t index, dsd_layout* out,
                                     dsd_error** err);
dsd_status dsd_state_dict_is_dist_tensor(const dsd_state_dict* sd, size_t index, bool* out,
                                         dsd_error** err);

/* ============================================================================================
 * Models, optimizers and the state-dict functions
 *
 * The semantics of torch.distributed.checkpoint.state_dict. A trainer registers its model
 * (parameters, buffers, extra state, under the raw names its module tree reports, in
 * state-dict order) and its optimizers (param groups and per-parameter state); dsd then
 * returns canonical-FQN-keyed state dicts whose tensors alias the registered ones, and loads
 * state dicts by copying into the registered tensors in place, after validating everything
 * (a failing load changes nothing). Tensor handles may carry a sharding layout; with a
 * communicator of more than one rank these functions are collective.
 * ========================================================================================== */

typedef struct dsd_model dsd_model;
typedef struct dsd_optim dsd_optim;

/* The keys a load did not match, as PyTorch's _IncompatibleKeys: one result object for model
 * loads (dsd_set_model_state_dict) and checkpoint loads (dsd_checkpoint_load). */
typedef struct dsd_incompatible_keys dsd_incompatible_keys;

typedef int32_t dsd_key_list;
#define DSD_KEYS_MISSING 1    /* expected by the target, absent from what was loaded */
#define DSD_KEYS_UNEXPECTED 2 /* in what was loaded, not in the target */
#define DSD_KEYS_SKIPPED 3    /* left untouched (checkpoint loads: keys not read) */

/* The number of keys in one list, and the key at a position (borrowed from `keys`).
 * Returns DSD_E_INVALID_ARGUMENT (an unknown list, an index out of range). */
dsd_status dsd_incompatible_keys_count(const dsd_incompatible_keys* keys, dsd_key_list list,
                                       size_t* out, dsd_error** err);
dsd_status dsd_incompatible_keys_key(const dsd_incompatible_keys* keys, dsd_key_list list,
                                     size_t index, const char** out, dsd_error** err);

/* Frees the result. NULL is a no-op. */
void dsd_incompatible_keys_free(dsd_incompatible_keys* keys);

typedef int32_t dsd_wrapper_kind;
#define DSD_WRAPPER_DDP 1        /* DistributedDataParallel: child "module" */
#define DSD_WRAPPER_FSDP 2       /* FSDP1: child "_fsdp_wrapped_module" */
#define DSD_WRAPPER_COMPILE 3    /* torch.compile: child "_orig_mod" */
#define DSD_WRAPPER_CHECKPOINT 4 /* activation checkpointing: child "_checkpoint_wrapped_module" */

/* PyTorch's StateDictOptions. Initialise with dsd_state_dict_options_init() (PyTorch's
 * defaults: all false except keep_submodule_prefixes and strict), then set fields. */
typedef struct dsd_state_dict_options {
  uint32_t struct_size; /* sizeof(dsd_state_dict_options), set by the _init function */
  bool full_state_dict;
  bool cpu_offload;
  bool ignore_frozen_params;
  bool keep_submodule_prefixes;
  bool strict;
  bool broadcast_from_rank0;
  bool flatten_optimizer_state_dict;
  const char* dsd_fqn_modifiers; /* borrowed; "_fqn_modifiers" by default (Python only) */
  uint64_t bucket_bytes;         /* bytes per gather/broadcast collective; 0 = 64 MiB */
} dsd_state_dict_options;

/* Fills `options` with the defaults. NULL is a no-op. */
void dsd_state_dict_options_init(dsd_state_dict_options* options);

/* A new empty model. `comm` (may be NULL: a single process) is shared: the model keeps its
 * own reference. `class_name` (may be NULL: "Model") names the model in load errors, as
 * "Error(s) in loading state_dict for <class_name>". Free with dsd_model_free().
 * Returns the common codes. */
dsd_status dsd_model_new(dsd_comm* comm, const char* class_name, dsd_model** out, dsd_error** err);
void dsd_model_free(dsd_model* model);

/* Registers a parameter / persistent or non-persistent buffer under its raw name. The model
 * keeps its own reference to the tensor (release your handle when you like). Two names on
 * the same memory (same data pointer, shape, strides, dtype, device, layout) are one tied
 * parameter.
 * Returns DSD_E_INVALID_ARGUMENT (a name registered twice or empty), DSD_E_STALE_HANDLE,
 * DSD_E_WRONG_KIND. */
dsd_status dsd_model_add_parameter(dsd_model* model, const char* name, dsd_tensor tensor,
                                   bool requires_grad, dsd_error** err);
dsd_status dsd_model_add_buffer(dsd_model* model, const char* name, dsd_tensor tensor,
                                bool persistent, dsd_error** err);

/* Registers a module's extra state, named "<module path>._extra_state": the value at
 * position `index` of `holder` (any kind; containers are shared), or raw bytes.
 * Returns DSD_E_INVALID_ARGUMENT (a name registered twice, not ending in "_extra_state", an
 * index out of range). */
dsd_status dsd_model_add_extra_state(dsd_model* model, const char* name,
                                     const dsd_state_dict* holder, size_t index, dsd_error** err);
dsd_status dsd_model_add_extra_state_bytes(dsd_model* model, const char* name, const void* data,
                                           size_t len, dsd_error** err);

/* Declares a wrapper module at a raw module path ("" for the root), so its token is dropped
 * from canonical FQNs (see DSD_WRAPPER_*). "_checkpoint_wrapped_module.",
 * "_fsdp_wrapped_module" and "_orig_mod" are dropped wherever they appear; "module" only
 * under a declared DDP wrapper.
 * Returns DSD_E_INVALID_ARGUMENT (an unknown kind). */
dsd_status dsd_model_declare_wrapper(dsd_model* model, const char* module_path,
                                     dsd_wrapper_kind kind, dsd_error** err);

/* An FQN modifier (PyTorch's `_fqn_modifiers`): the module at `module_path` maps state-dict
 * segment `segment` to its child attribute `child`, whose segment is dropped from FQNs.
 * Returns DSD_E_INVALID_ARGUMENT (an empty segment or child). */
dsd_status dsd_model_add_fqn_modifier(dsd_model* model, const char* module_path,
                                      const char* segment, const char* child, dsd_error** err);

/* The canonical FQN of a raw name under the model's declarations, borrowed from `model`
 * (valid until it is freed). Returns the common codes. */
dsd_status dsd_model_canonical_fqn(const dsd_model* model, const char* raw_name, const char** out,
                                   dsd_error** err);

/* A new dict of every registered entry by raw name with its current value (tensors aliased,
 * extra state as loaded), in registration order: how a trainer reads extra state back after
 * a load. Returns the common codes. */
dsd_status dsd_model_entries(const dsd_model* model, dsd_state_dict** out, dsd_error** err);

/* A new empty optimizer registry. Free with dsd_optim_free(). Returns the common codes. */
dsd_status dsd_optim_new(dsd_optim** out, dsd_error** err);
void dsd_optim_free(dsd_optim* optim);

/* Adds a param group: `options` (may be NULL: none) is the dict of hyperparameters (any
 * values, no "params" key), kept by reference: a load updates it in place, so the trainer
 * sees loaded hyperparameters (e.g. "lr", or "initial_lr" carried over) there. `params`
 * lists the group's `count` parameters (the same tensors the model registered).
 * Returns DSD_E_INVALID_ARGUMENT (a "params" key, a parameter already in a group),
 * DSD_E_WRONG_KIND (options not a dict), DSD_E_STALE_HANDLE. */
dsd_status dsd_optim_add_param_group(dsd_optim* optim, dsd_state_dict* options,
                                     const dsd_tensor* params, size_t count, dsd_error** err);

/* Sets a parameter's state dict (e.g. {"step", "exp_avg", "exp_avg_sq"}), kept by reference:
 * a load copies tensors into it in place and replaces its other values. `state` NULL clears
 * it.
 * Returns DSD_E_NOT_FOUND (`param` is in no group), DSD_E_STALE_HANDLE, DSD_E_WRONG_KIND. */
dsd_status dsd_optim_set_param_state(dsd_optim* optim, dsd_tensor param, dsd_state_dict* state,
                                     dsd_error** err);

/* A new reference to a parameter's state dict.
 * Returns DSD_E_NOT_FOUND (`param` is in no group, or has no state), DSD_E_STALE_HANDLE,
 * DSD_E_WRONG_KIND. */
dsd_status dsd_optim_get_param_state(const dsd_optim* optim, dsd_tensor param,
                                     dsd_state_dict** out, dsd_error** err);

/* The number of param groups, and a new reference to group `index`'s hyperparameter dict.
 * Returns DSD_E_INVALID_ARGUMENT (index out of range). */
dsd_status dsd_optim_param_group_count(const dsd_optim* optim, size_t* out, dsd_error** err);
dsd_status dsd_optim_get_param_group(const dsd_optim* optim, size_t index, dsd_state_dict** out,
                                     dsd_error** err);

/* Creates the state of parameters that have none yet, for optimizers that create it lazily,
 * leaving no numerical trace (no step: counters and moments start as a fresh optimizer's).
 * Called on the calling thread by every get/set that involves `optim` when trainable
 * parameters lack state, with handles of those `count` parameters (valid during the call)
 * and their positions across the optimizer's groups (`pids`, PyTorch's parameter ids); it
 * registers state with dsd_optim_set_param_state(). A status other than DSD_OK fails the
 * get/set with DSD_E_CALLBACK. */
typedef dsd_status (*dsd_materialize_fn)(void* user_data, dsd_optim* optim,
                                         const dsd_tensor* params, const size_t* pids,
                                         size_t count);

/* Installs (fn NULL: removes) the materialize callback. Returns the common codes. */
dsd_status dsd_optim_set_materialize(dsd_optim* optim, dsd_materialize_fn fn, void* user_data,
                                     dsd_error** err);

/* get_model_state_dict: a new dict keyed by canonical FQN, tensors aliasing the model's
 * (unless options ask for CPU or full tensors). `options` may be NULL (defaults).
 * The _submodules form (deprecated, as in PyTorch) keeps only the entries under the given
 * raw module paths.
 * Returns DSD_E_INVALID_ARGUMENT (PyTorch's option-validation errors), DSD_E_NOT_FOUND (an
 * empty state dict, a submodule matching nothing), DSD_E_UNSUPPORTED (option bytes),
 * DSD_E_COMM, DSD_E_TIMEOUT. */
dsd_status dsd_get_model_state_dict(dsd_model* model, const dsd_state_dict_options* options,
                                    dsd_state_dict** out, dsd_error** err);
dsd_status dsd_get_model_state_dict_submodules(dsd_model* model, const char* const* submodules,
                                               size_t count, const dsd_state_dict_options* options,
                                               dsd_state_dict** out, dsd_error** err);

/* set_model_state_dict: copies `state_dict` into the model's tensors in place. Strict (the
 * default): missing or unexpected keys fail with nn.Module.load_state_dict's message. Shape
 * and dtype mismatches fail whatever `strict` says. Nothing is written when the call fails.
 * `out_keys` (may be NULL) receives the missing and unexpected keys.
 * Returns DSD_E_NOT_FOUND (a missing key, strict), DSD_E_UNEXPECTED_KEY (strict),
 * DSD_E_SHAPE_MISMATCH, DSD_E_DTYPE_MISMATCH, DSD_E_WRONG_KIND, DSD_E_READ_ONLY,
 * DSD_E_UNSUPPORTED (option bytes), DSD_E_COMM, DSD_E_TIMEOUT. */
dsd_status dsd_set_model_state_dict(dsd_model* model, const dsd_state_dict* state_dict,
                                    const dsd_state_dict_options* options,
                                    dsd_incompatible_keys** out_keys, dsd_error** err);

/* get_optimizer_state_dict of `count` optimizers merged: {"state": {fqn: {...}},
 * "param_groups": [{..., "params": [fqn, ...]}]}, or the flattened form with
 * flatten_optimizer_state_dict.
 * Returns DSD_E_INVALID_ARGUMENT (options; a group parameter the model lacks),
 * DSD_E_CALLBACK (the materialize callback failed), DSD_E_UNSUPPORTED (option bytes),
 * DSD_E_COMM, DSD_E_TIMEOUT. */
dsd_status dsd_get_optimizer_state_dict(dsd_model* model, dsd_optim* const* optims, size_t count,
                                        const dsd_state_dict_options* options,
                                        dsd_state_dict** out, dsd_error** err);

/* set_optimizer_state_dict: the format (nested FQN, flattened, or PyTorch's positional
 * optim.state_dict()) is detected; state is split into the current groups in their order.
 * Returns DSD_E_NOT_FOUND (a missing parameter state or group), DSD_E_UNEXPECTED_KEY,
 * DSD_E_SHAPE_MISMATCH, DSD_E_DTYPE_MISMATCH, DSD_E_WRONG_KIND, DSD_E_INVALID_ARGUMENT
 * (inconsistent groups), DSD_E_CALLBACK, DSD_E_UNSUPPORTED, DSD_E_COMM, DSD_E_TIMEOUT. */
dsd_status dsd_set_optimizer_state_dict(dsd_model* model, dsd_optim* const* optims, size_t count,
                                        const dsd_state_dict* optim_state_dict,
                                        const dsd_state_dict_options* options, dsd_error** err);

/* get_state_dict / set_state_dict: both at once. set loads the optimizers first; an empty
 * model state dict means optimizer only.
 * Returns the codes of dsd_get_model_state_dict() and dsd_get_optimizer_state_dict() (get),
 * of dsd_set_model_state_dict() and dsd_set_optimizer_state_dict() (set). */
dsd_status dsd_get_state_dict(dsd_model* model, dsd_optim* const* optims, size_t count,
                              const dsd_state_dict_options* options, dsd_state_dict** out_model,
                              dsd_state_dict** out_optim, dsd_error** err);
dsd_status dsd_set_state_dict(dsd_model* model, dsd_optim* const* optims, size_t count,
                              const dsd_state_dict* model_state_dict,
                              const dsd_state_dict* optim_state_dict,
                              const dsd_state_dict_options* options,
                              dsd_incompatible_keys** out_keys, dsd_error** err);

/* Pure remapping between PyTorch's positional optimizer state dict (state keyed by parameter
 * id, an int-keyed dict; groups listing ids) and the FQN form, given the FQN of each
 * parameter id in order (`names[pid]`, `count` of them). New dicts; tensors shared.
 * Returns DSD_E_NOT_FOUND (an id or FQN without a name), DSD_E_WRONG_KIND (a malformed
 * optimizer state dict). */
dsd_status dsd_optim_state_dict_to_fqn(const dsd_state_dict* positional, const char* const* names,
                                       size_t count, dsd_state_dict** out, dsd_error** err);
dsd_status dsd_optim_state_dict_to_positional(const dsd_state_dict* fqn_form,
                                              const char* const* names, size_t count,
                                              dsd_state_dict** out, dsd_error** err);

/* ============================================================================================
 * Checkpoints
 *
 * A checkpoint is a directory: plain safetensors data files (readable by the safetensors
 * library and PyTorch DCP's HuggingFaceStorageReader) and a JSON manifest,
 * checkpoint.json, written last and atomically: without it the directory is not a
 * checkpoint. Every byte is covered by XXH3-64 checksums that loads verify. No pickle.
 *
 * `comm` NULL means a single process (world size 1). Collective functions (those with a
 * communicator, given or held) are called by every rank in the same order; an error on one
 * rank is returned on every rank.
 * ========================================================================================== */

/* Formats of checkpoints and state-dict files (the `format` field of the save options;
 * dsd_format_detect, dsd_format_convert):
 * - a dsd checkpoint directory;
 * - a PyTorch DCP checkpoint directory (.metadata, or rank-local __<rank>.metadata, and
 *   .distcp data files), which dsd_checkpoint_load reads in place with resharding;
 * - a torch.save file (read through a restricted pickle reader that executes nothing);
 * - Hugging Face safetensors: a directory of model-0000i-of-0000N.safetensors files and
 *   model.safetensors.index.json, or one .safetensors file. */
typedef int32_t dsd_format;
#define DSD_FORMAT_DSD 1
#define DSD_FORMAT_DCP 2
#define DSD_FORMAT_TORCH 3
#define DSD_FORMAT_SAFETENSORS 4

typedef struct dsd_checkpoint_save_options {
  uint32_t struct_size;     /* sizeof(dsd_checkpoint_save_options), set by the _init function */
  bool overwrite;           /* replace an existing checkpoint (after the new one commits) */
  int32_t thread_count;     /* writer threads (= data files) per rank; 0: min(4, C), C =
                               the usable cores / ranks on this machine (LOCAL_WORLD_SIZE) */
  bool save_to_lowest_rank; /* replicated chunks written by the lowest rank, not balanced */
  bool sync_files;          /* fsync data files before the commit (default true) */
  uint64_t block_size;      /* bytes per checksummed block, a power of two >= 4096 (4 MiB) */
  dsd_format format;        /* DSD_FORMAT_DSD (default) or DSD_FORMAT_DCP: PyTorch DCP's own
                               format (.metadata + __<rank>_<k>.distcp), which dcp.load reads */
  /* Since 1.1 (both fields; a 1.0 caller's struct_size, 32, reads them as false and 0). */
  bool enable_plan_caching; /* as DCP's: a save whose structure (every rank's keys, dtypes,
                               shapes, chunks, options and world) has the fingerprint of an
                               earlier save over the same communicator reuses its global plan
                               instead of gathering and planning again (default false) */
  uint64_t max_staging_bytes; /* async saves: the most host memory staging buffers hold at
                                 once; a larger state is staged in waves, each copied into
                                 buffers freed by tensors already written, so
                                 dsd_checkpoint_save_async returns once the last wave is
                                 copied (later than without a cap); a single storage larger
                                 than the cap is staged alone. Ignored by dsd_checkpoint_save
                                 (0: no cap, the default) */
  /* Since 1.2 (a 1.1 caller's struct_size, 40, reads them as NULL and false). An
   * incremental save: the path of a dsd checkpoint in the same parent directory (the
   * previous step) whose chunks the new checkpoint references instead of writing them again
   * when their bytes are unchanged (same key, dtype, offsets and sizes; checksums equal and
   * a byte compare against the base's file). The new checkpoint then needs the files it
   * references to load (DSD_E_NOT_FOUND naming a missing one); a manager's retention keeps
   * them. Borrowed for the call (an async save copies it). NULL or "" (default): none.
   * DSD_E_INVALID_ARGUMENT for a base that is the destination, not a sibling of it, or a
   * DCP checkpoint, or with DSD_FORMAT_DCP; DSD_E_NOT_FOUND when it holds no checkpoint. */
  const char* base;
  /* Saves through a dsd_checkpoint_manager: the base is the newest complete step before
   * this one (none for the first). A plain dsd_checkpoint_save with it and no `base` is
   * DSD_E_INVALID_ARGUMENT. Default false. */
  bool incremental;
} dsd_checkpoint_save_options;

/* Fills `options` with the defaults. NULL is a no-op. */
void dsd_checkpoint_save_options_init(dsd_checkpoint_save_options* options);

typedef struct dsd_checkpoint_load_options {
  uint32_t struct_size;  /* sizeof(dsd_checkpoint_load_options), set by the _init function */
  bool strict;           /* a key missing from the checkpoint is an error (default true) */
  int32_t thread_count;  /* reader threads; 0: min(8, C), C as for saves */
  bool verify;           /* check the checksum of every byte read (default true) */
  /* a dsd checkpoint's data files are opened inside its directory and never through a
   * symbolic link (DSD_E_CORRUPT naming the file); true follows links, to anywhere
   * (default false). Imports (dsd_safetensors_import, dsd_format_convert from safetensors)
   * always follow links: a Hugging Face cache snapshot is links into ../../blobs/. */
  bool allow_external_files;
  /* Since 1.1 (both in the 1.0 struct's tail padding, so its size stays 16). At world > 1 a
   * tensor every rank loads whole (plain tensors, replicated DTensors) is read from storage
   * by one rank (byte-balanced), verified there and broadcast to the others in bounded
   * buckets, instead of being read by every rank; a corrupt chunk fails every rank with the
   * reader's error. cooperative_load (default true) does it when the ranks run on more than
   * one host; cooperative_load_on_one_host (default false) also when they share one, where
   * reading from the shared page cache is usually cheaper than a broadcast. Used only when
   * every rank asks the same. Chunks needed by only some ranks (HSDP replica groups) are
   * read by each rank that needs them. */
  bool cooperative_load;
  bool cooperative_load_on_one_host;
} dsd_checkpoint_load_options;

/* Fills `options` with the defaults. NULL is a no-op. */
void dsd_checkpoint_load_options_init(dsd_checkpoint_load_options* options);

/* Saves the state dict `sd` (nested dicts and lists of tensors and values; tensors on CPU or
 * CUDA) to the directory `path`. `options` may be NULL (defaults). Borrows everything;
 * tensors must not be written to until it returns. Collective over `comm`; with `comm` NULL
 * the save runs over one process-wide local communicator, so enable_plan_caching reuses
 * plans across such calls too.
 * Returns DSD_E_EXISTS (a checkpoint is there and !overwrite; the message names the path),
 * DSD_E_NO_SPACE (disk full or file size limit; the previous checkpoint is intact),
 * DSD_E_IO, DSD_E_INVALID_ARGUMENT (bad options, plans that do not validate),
 * DSD_E_UNSUPPORTED (unknown option bytes; a value the format cannot hold), DSD_E_COMM,
 * DSD_E_TIMEOUT.
 * Concurrency: one save per directory at a time. The coordinator (rank 0) holds an exclusive
 * flock() on the directory `path` itself for the whole save (an async save: until its
 * background write ends); a second save to the same path meanwhile, from any process and
 * with or without overwrite, returns DSD_E_EXISTS at once and changes nothing. The kernel
 * drops the lock when its holder dies, so a killed save never blocks the next one (which
 * removes the killed one's leftovers when it commits). Loads take no lock: the manifest is
 * committed by an atomic rename, so a load running during a save (or a retention removing
 * the step) reads the whole old or the whole new checkpoint, or fails with an error
 * (DSD_E_NOT_FOUND, DSD_E_CORRUPT, DSD_E_IO) when the files it began with were replaced;
 * never a mix. The lock needs a file system whose flock() is honoured by every writer
 * (local disks, tmpfs; NFSv4 and Lustre mounted with flock). */
dsd_status dsd_checkpoint_save(dsd_comm* comm, const dsd_state_dict* sd, const char* path,
                               const dsd_checkpoint_save_options* options, dsd_error** err);

/* An asynchronous checkpointer, as PyTorch's AsyncCheckpointer: reusable host staging
 * buffers (pinned when CUDA is available; the same structure saved again allocates nothing)
 * and one background thread that writes and commits, over its own clone of `comm` (NULL: a
 * single process), so its collectives never interleave with the trainer's. Independent
 * checkpointers never wait for each other (no process-wide state). Not collective: the
 * background communicator is cloned, collectively, by its first save. Keeps a reference to
 * `comm`. Free with dsd_async_checkpointer_free(). Returns the common codes. */
typedef struct dsd_async_checkpointer dsd_async_checkpointer;
dsd_status dsd_async_checkpointer_new(dsd_comm* comm, dsd_async_checkpointer** out,
                                      dsd_error** err);

/* Waits for the save in flight, stops the thread, frees the staging buffers. NULL is a no-op. */
void dsd_async_checkpointer_free(dsd_async_checkpointer* checkpointer);

typedef struct dsd_future dsd_future;

/* Starts an asynchronous save: copies the state into the checkpointer's host buffers, then
 * writes and commits on its background thread. When it returns the tensors may be modified
 * again. A save still in flight on this checkpointer is waited for first. *out receives a
 * future the caller frees with dsd_future_free(). Errors of the save itself (also staging
 * errors) are reported by dsd_future_wait(), on every rank. Collective.
 * Returns DSD_E_UNSUPPORTED (unknown option bytes), DSD_E_INVALID_ARGUMENT (bad options),
 * DSD_E_COMM, DSD_E_TIMEOUT (the first save's background communicator could not be made). */
dsd_status dsd_checkpoint_save_async(dsd_async_checkpointer* checkpointer, const dsd_state_dict* sd,
                                     const char* path, const dsd_checkpoint_save_options* options,
                                     dsd_future** out, dsd_error** err);

/* Waits for an asynchronous save: up to `timeout_ms` milliseconds (negative: forever).
 * Any thread.
 * Returns DSD_OK once committed, DSD_E_TIMEOUT while still running, otherwise the save's
 * error: the codes of dsd_checkpoint_save(). */
dsd_status dsd_future_wait(dsd_future* future, int64_t timeout_ms, dsd_error** err);

/* Whether the state has been staged (always true once dsd_checkpoint_save_async returned) /
 * whether the save has finished, committed or failed. Any thread. Returns the common codes. */
dsd_status dsd_future_is_staged(const dsd_future* future, bool* out, dsd_error** err);
dsd_status dsd_future_is_done(const dsd_future* future, bool* out, dsd_error** err);

/* Frees a future. A save in flight goes on to completion. A future stays usable after its
 * checkpointer or manager is freed (which waits for the save). NULL is a no-op. */
void dsd_future_free(dsd_future* future);

/* Loads the checkpoint at `path` (a dsd checkpoint, or a PyTorch DCP checkpoint written by
 * dcp.save at any world size) into `sd`, in place, resharding as needed: each tensor
 * receives the saved bytes of its region; non-tensor values are replaced. `options` may be
 * NULL. `out_keys` may be NULL; otherwise it receives the missing, unexpected and skipped
 * keys. Collective over `comm`.
 * Returns DSD_E_NOT_FOUND (no checkpoint; a missing key when strict, named),
 * DSD_E_SHAPE_MISMATCH, DSD_E_DTYPE_MISMATCH (naming the key, saved and current),
 * DSD_E_WRONG_KIND, DSD_E_READ_ONLY, DSD_E_CORRUPT (checksum, truncated or malformed file;
 * names file and key), DSD_E_IO, DSD_E_UNSUPPORTED (option bytes), DSD_E_COMM,
 * DSD_E_TIMEOUT. */
dsd_status dsd_checkpoint_load(dsd_comm* comm, dsd_state_dict* sd, const char* path,
                               const dsd_checkpoint_load_options* options,
                               dsd_incompatible_keys** out_keys, dsd_error** err);

/* A new state dict of full CPU tensors and values read from the checkpoint at `path`, without
 * a communicator (like DCP's _load_state_dict_from_keys). `keys` (`count` of them; NULL when
 * 0) selects flat keys or dotted prefixes of nested paths ("model" selects
 * "model.layer.weight"); none selects all. The caller releases *out.
 * Returns DSD_E_NOT_FOUND (no checkpoint, or a key matching nothing), DSD_E_CORRUPT,
 * DSD_E_IO. */
dsd_status dsd_checkpoint_load_full(const char* path, const char* const* keys, size_t count,
                                    dsd_state_dict** out, dsd_error** err);

/* Reads every chunk of the checkpoint at `path` and checks its checksums (a DCP checkpoint,
 * which has none: that every chunk is where its metadata says, readable and in bounds).
 * Returns DSD_OK when intact, DSD_E_CORRUPT naming the first damaged file and key,
 * DSD_E_NOT_FOUND (no checkpoint), DSD_E_IO. */
dsd_status dsd_checkpoint_verify(const char* path, dsd_error** err);

/* A checkpoint manager over the directory `root`: saves go to `root/step_<N>`, a `latest`
 * file moves after each commit, and only the newest `keep_last` complete checkpoints are
 * kept (`keep_last` <= 0: all). Its saves and loads are collective over `comm` (NULL: a
 * single process), which it keeps a reference to; its asynchronous saves go through its own
 * dsd_async_checkpointer, made by its first asynchronous save. Not collective. Free with
 * dsd_checkpoint_manager_free(). Returns the common codes. */
typedef struct dsd_checkpoint_manager dsd_checkpoint_manager;
dsd_status dsd_checkpoint_manager_new(dsd_comm* comm, const char* root, int32_t keep_last,
                                      dsd_checkpoint_manager** out, dsd_error** err);

/* Frees a manager, waiting for its asynchronous save in flight. NULL is a no-op. */
void dsd_checkpoint_manager_free(dsd_checkpoint_manager* manager);

/* Saves step `step` (as dsd_checkpoint_save), then moves `latest` and applies retention.
 * Returns the codes of dsd_checkpoint_save(), and DSD_E_INVALID_ARGUMENT (a negative step). */
dsd_status dsd_checkpoint_manager_save(dsd_checkpoint_manager* manager, const dsd_state_dict* sd,
                                       int64_t step, const dsd_checkpoint_save_options* options,
                                       dsd_error** err);

/* The same asynchronously (as dsd_checkpoint_save_async); `latest` and retention follow the
 * commit. Returns the codes of dsd_checkpoint_save_async(). */
dsd_status dsd_checkpoint_manager_save_async(dsd_checkpoint_manager* manager,
                                             const dsd_state_dict* sd, int64_t step,
                                             const dsd_checkpoint_save_options* options,
                                             dsd_future** out, dsd_error** err);

/* The newest complete step: *out_found is false when there is none (then *out_step is left
 * alone). Not collective. Returns DSD_E_IO. */
dsd_status dsd_checkpoint_manager_latest_step(const dsd_checkpoint_manager* manager,
                                              bool* out_found, int64_t* out_step, dsd_error** err);

/* Loads the newest complete step into `sd` (as dsd_checkpoint_load), skipping incomplete
 * ones. *out_found is false (and `sd` untouched) when there is none; otherwise *out_step
 * receives the step. Returns the codes of dsd_checkpoint_load(). */
dsd_status dsd_checkpoint_manager_load_latest(dsd_checkpoint_manager* manager, dsd_state_dict* sd,
                                              const dsd_checkpoint_load_options* options,
                                              bool* out_found, int64_t* out_step, dsd_error** err);

/* What dsd_checkpoint_gc did (filled by it; an output only, so it has no struct_size: a
 * later version that reports more adds a function rather than fields). */
typedef struct dsd_checkpoint_gc_report {
  int64_t retired_removed;  /* retired checkpoint directories removed whole */
  int64_t files_removed;    /* unreferenced data files removed from retired ones kept */
  uint64_t bytes_removed;   /* bytes of everything removed */
} dsd_checkpoint_gc_report;

/* Garbage collection of an incremental checkpoint root, by the rule a manager's retention
 * follows: a retired checkpoint (a subdirectory of `root` whose checkpoint.json a manager, or
 * `dsd gc --retire`, renamed to checkpoint.retired.json) loses the data files no live
 * checkpoint of `root` references, and is removed whole once none is referenced. Counting
 * happens before anything is removed, so a kill at any moment leaves every live checkpoint
 * loadable. *out receives the counts. Not collective: one process runs it, while no save
 * takes a retired checkpoint as its base. Returns DSD_E_NOT_FOUND (no `root`), DSD_E_IO
 * (also a live manifest that cannot be read: nothing is removed then). */
dsd_status dsd_checkpoint_gc(const char* root, dsd_checkpoint_gc_report* out, dsd_error** err);

/* ============================================================================================
 * Formats and conversions
 * ========================================================================================== */

typedef struct dsd_format_convert_options {
  uint32_t struct_size;    /* sizeof(dsd_format_convert_options), set by the _init function */
  bool overwrite;          /* replace what is at the destination once the new output is complete */
  int32_t thread_count;    /* writer threads; 0: min(4, C), C as for saves */
  uint64_t max_shard_size; /* safetensors: most data bytes per file (default 5e9; 0: one file) */
  /* a key prefix: only the entries whose flat key is `select` or starts with `select` + "."
   * are written ("model" and "model." both select {"model": {...}}); borrowed for the call;
   * NULL or "" (default): everything. DSD_E_NOT_FOUND, naming the prefix and the source,
   * when it matches no key. */
  const char* select;
  /* drop `select` and its dot from the written keys ("model.layers.0.weight" is written as
   * "layers.0.weight"), as Hugging Face checkpoints are keyed; needs `select`
   * (DSD_E_INVALID_ARGUMENT without it, or when two keys would become one). Default false. */
  bool strip_prefix;
  /* 0 (unset, the default): every tensor keeps its dtype; a floating DSD_DTYPE_* (F16,
   * BF16, F32, F64, F8_*): every floating tensor is cast to it, rounding as torch's
   * Tensor.to does (to nearest, ties to even), while integer, bool and complex tensors are
   * written as they are. Any other dtype is DSD_E_INVALID_ARGUMENT. */
  dsd_dtype dtype;
  /* Since 1.2 (a 1.1 caller's struct_size, 40, reads both as false). Dequantize FP8
   * block-scaled weights (DeepSeek-V3 style): every float8 `X` with a float32
   * `X_scale_inv` (one scale per 128x128 block) is written as X * scale in `dtype`
   * (default bfloat16), as PyTorch's QuantizedHuggingFaceStorageReader, and the
   * `_scale_inv` tensors are dropped. Default false. */
  bool dequantize;
  /* dsd_format_convert to DSD_FORMAT_DSD from a dsd checkpoint: copy it as it is (its
   * files, layout and checksums), with the files an incremental checkpoint references in
   * its base checkpoints copied in, so it stands alone; `dst` may be `src` (in place, safe
   * to be killed at any moment). No other option may be set with it
   * (DSD_E_INVALID_ARGUMENT). Default false. */
  bool materialize;
} dsd_format_convert_options;

/* Fills `options` with the defaults. NULL is a no-op. */
void dsd_format_convert_options_init(dsd_format_convert_options* options);

/* The format of what is at `path` (a DSD_FORMAT_*).
 * Returns DSD_E_NOT_FOUND (nothing there, or a directory holding no checkpoint),
 * DSD_E_UNSUPPORTED (a file of another kind), DSD_E_IO. */
dsd_status dsd_format_detect(const char* path, dsd_format* out, dsd_error** err);

/* A description of what is at `path` (any format, detected; dsd_format_detect), read from its
 * metadata alone: no tensor data is read. *out receives a new state dict of plain values
 * that the caller releases:
 *   {"format": "dsd" | "dcp" | "torch" | "safetensors",
 *    "world_size": the ranks that wrote it (1 for a single file),
 *    "entries": {flat key: {"kind": "tensor" | "value",
 *                           "path": [the nested path: str keys and int list indices],
 *                           and for tensors: "dtype" (torch's name: "float32"),
 *                           "shape": [int...], "nbytes": int (numel * element size),
 *                           "chunks": [{"offsets": [int...], "sizes": [int...]}...] (the
 *                           saved pieces; one covering the tensor for a single file)}},
 *    "owned_bytes": tensor data bytes in the checkpoint's own files (all of them, but for an
 *                   incremental dsd checkpoint),
 *    "referenced_bytes": {base checkpoint directory name: tensor data bytes it references
 *                         there} (since 1.2; empty unless incremental)}
 * Entries are in the order of the checkpoint's manifest or file. `options` may be NULL (the
 * defaults); only its allow_external_files is read (as for dsd_checkpoint_load: a dsd
 * checkpoint's data files are opened without following links unless it is true). Single
 * process; any thread.
 * Returns DSD_E_NOT_FOUND (nothing there, or a directory holding no checkpoint),
 * DSD_E_CORRUPT (a malformed manifest, metadata or header, naming the file),
 * DSD_E_UNSUPPORTED (a file of another kind; unknown option bytes), DSD_E_IO. */
dsd_status dsd_format_inspect(const char* path, const dsd_checkpoint_load_options* options,
                              dsd_state_dict** out, dsd_error** err);

/* Converts what is at `src` (any format, detected) into `dst` in format `to`, tensor by
 * tensor: a sharded checkpoint's tensors are assembled one at a time, so memory holds about
 * one tensor per writer thread (a torch.save source is mapped, not read into memory). A
 * checkpoint is written as by one process; torch.save as an OrderedDict that torch.load
 * (weights_only=True) accepts; safetensors as a consolidated Hugging Face directory with its
 * index. The options' select, strip_prefix and dtype choose what is written: the model of a
 * training checkpoint {"model", "optim", "step"}, keyed and cast as Hugging Face's
 * from_pretrained expects, is select "model", strip_prefix, DSD_DTYPE_BF16. `options` may be
 * NULL. Single process; any thread.
 * Returns DSD_E_EXISTS (`dst` exists and !overwrite), DSD_E_INVALID_ARGUMENT (unknown
 * format; strip_prefix without select, a non-floating dtype, keys the strip empties or
 * merges), DSD_E_NOT_FOUND (also: select matches no key), DSD_E_CORRUPT,
 * DSD_E_UNSUPPORTED (naming what cannot be represented; unknown option bytes), DSD_E_IO,
 * DSD_E_NO_SPACE. */
dsd_status dsd_format_convert(const char* src, const char* dst, dsd_format to,
                              const dsd_format_convert_options* options, dsd_error** err);

/* Writes the state dict `sd` (full CPU or CUDA tensors, no distributed tensors) as a
 * torch.save file at `path` (written aside and renamed: complete or absent), which torch.load
 * with weights_only=True reads back identically: the top level as an OrderedDict, int-keyed
 * dicts with int keys, tuples as tuples. Borrows `sd`. `options` may be NULL; its select,
 * strip_prefix and dtype apply as for dsd_format_convert().
 * Returns DSD_E_EXISTS, DSD_E_UNSUPPORTED (a distributed tensor; option bytes), DSD_E_IO,
 * DSD_E_NO_SPACE, and those of the options as for dsd_format_convert(). */
dsd_status dsd_torch_save_export(const dsd_state_dict* sd, const char* path,
                                 const dsd_format_convert_options* options, dsd_error** err);

/* Reads a torch.save file into a new state dict of CPU tensors (*out, which the caller
 * releases). Nothing in the file is executed: only the classes of plain state (OrderedDict,
 * tensors, storages, dtypes, torch.Size...) are allowed. Views that shared a storage still
 * share one.
 * Returns DSD_E_NOT_FOUND, DSD_E_CORRUPT, DSD_E_UNSUPPORTED (a class outside the allow-list,
 * named), DSD_E_IO. */
dsd_status dsd_torch_save_import(const char* path, dsd_state_dict** out, dsd_error** err);

/* Writes the state dict `sd` as a consolidated Hugging Face safetensors directory `dir`:
 * model-0000i-of-0000N.safetensors files of at most options->max_shard_size data bytes each
 * and model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"}), keyed by
 * flat keys ("model.layer.weight"). Non-tensor values and the nesting travel in the first
 * file's __metadata__ ("dsd.state") for dsd_safetensors_import. `options` may be NULL; its
 * select, strip_prefix and dtype apply as for dsd_format_convert().
 * Returns DSD_E_EXISTS, DSD_E_UNSUPPORTED (a dtype safetensors lacks; option bytes),
 * DSD_E_IO, DSD_E_NO_SPACE, and those of the options as for dsd_format_convert(). */
dsd_status dsd_safetensors_export(const dsd_state_dict* sd, const char* dir,
                                  const dsd_format_convert_options* options, dsd_error** err);

/* Reads a safetensors directory (through its index, or every .safetensors file) or a single
 * .safetensors file into a new state dict (*out, which the caller releases): flat keys, or
 * the nesting and values dsd recorded. Unlike a dsd checkpoint's data files, the files of an
 * import may be symbolic links, to anywhere (a Hugging Face cache snapshot links into
 * ../../blobs/); their headers get the same checks (bounded JSON depth, no repeated names).
 * Returns DSD_E_NOT_FOUND, DSD_E_WRONG_KIND (a checkpoint of another format),
 * DSD_E_CORRUPT, DSD_E_IO. */
dsd_status dsd_safetensors_import(const char* path, dsd_state_dict** out, dsd_error** err);

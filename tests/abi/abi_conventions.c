/* The conventions block of dsd_decls.h, through dsd.h only:
 * - `*err` must be NULL on entry: a call that finds an error object there returns
 *   DSD_E_INVALID_ARGUMENT, does nothing (no output written, nothing added, released or
 *   created) and leaves that object as it was;
 * - every option struct is read by one rule, checked by one helper over one table of
 *   (struct, function) rows: NULL is the defaults, struct_size = sizeof is read, a larger
 *   struct with an all-zero tail is accepted, a non-zero byte in that tail is
 *   DSD_E_UNSUPPORTED, any other struct_size (0, sizeof - 1) DSD_E_INVALID_ARGUMENT; an
 *   earlier version's struct_size is read up to its end (dsd_format_convert_options);
 * - 0 is never a valid enumeration value: a zeroed field is refused, never taken as the
 *   first constant. */
#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <stdalign.h>
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>

#include "check.h"

/* ------------------------------------------------------------------------------------------
 * What the calls work on: a temporary directory, a state dict of the caller's memory, a model,
 * a checkpoint of the state dict, an asynchronous checkpointer and a checkpoint manager. */

typedef struct {
  char dir[64];
  char path[160]; /* the last fresh path */
  int counter;
  float w[4], w_model[4];
  dsd_state_dict* sd;       /* {"w": w, "step": 3} */
  dsd_state_dict* model_sd; /* {"w": w}: what the model's state dict looks like */
  dsd_model* model;         /* one parameter "w" over w_model */
  char ckpt[128];           /* a checkpoint of sd */
  dsd_async_checkpointer* saver;
  dsd_checkpoint_manager* manager;
  int64_t manager_step;
} Fixture;

/* A path under the fixture's directory that nothing has used yet. */
static const char* fresh_path(Fixture* f, const char* what) {
  snprintf(f->path, sizeof f->path, "%s/%s_%d", f->dir, what, f->counter++);
  return f->path;
}

static dsd_tensor wrap(float* data) {
  const int64_t shape[1] = {4};
  dsd_tensor t = {0};
  CHECK_OK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, shape, 1, NULL, (dsd_device){DSD_DEVICE_CPU, 0},
                                false, NULL, NULL, &t, ERR));
  return t;
}

static void fixture_init(Fixture* f) {
  memset(f, 0, sizeof *f);
  snprintf(f->dir, sizeof f->dir, "/tmp/dsd_abi_conventions_XXXXXX");
  if (mkdtemp(f->dir) == NULL) {
    perror("mkdtemp");
    exit(1);
  }
  for (int i = 0; i < 4; ++i) f->w[i] = (float)i, f->w_model[i] = (float)-i;
  dsd_tensor t = wrap(f->w), tm = wrap(f->w_model);
  CHECK_OK(dsd_state_dict_new(&f->sd, ERR));
  CHECK_OK(dsd_state_dict_set_tensor(f->sd, "w", t, ERR));
  CHECK_OK(dsd_state_dict_set_int(f->sd, "step", 3, ERR));
  CHECK_OK(dsd_state_dict_new(&f->model_sd, ERR));
  CHECK_OK(dsd_state_dict_set_tensor(f->model_sd, "w", t, ERR));
  CHECK_OK(dsd_model_new(NULL, "Net", &f->model, ERR));
  CHECK_OK(dsd_model_add_parameter(f->model, "w", tm, true, ERR));
  CHECK_OK(dsd_tensor_release(t, ERR));
  CHECK_OK(dsd_tensor_release(tm, ERR));
  snprintf(f->ckpt, sizeof f->ckpt, "%s", fresh_path(f, "ckpt"));
  CHECK_OK(dsd_checkpoint_save(NULL, f->sd, f->ckpt, NULL, ERR));
  CHECK_OK(dsd_async_checkpointer_new(NULL, &f->saver, ERR));
  CHECK_OK(dsd_checkpoint_manager_new(NULL, fresh_path(f, "managed"), 2, &f->manager, ERR));
  f->manager_step = 1;
  CHECK_OK(dsd_checkpoint_manager_save(f->manager, f->sd, f->manager_step++, NULL, ERR));
}

static int remove_entry(const char* path, const struct stat* st, int flag, struct FTW* ftw) {
  (void)st, (void)flag, (void)ftw;
  return remove(path);
}

static void fixture_free(Fixture* f) {
  dsd_checkpoint_manager_free(f->manager);
  dsd_async_checkpointer_free(f->saver);
  dsd_model_free(f->model);
  dsd_state_dict_release(f->model_sd);
  dsd_state_dict_release(f->sd);
  nftw(f->dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* ------------------------------------------------------------------------------------------
 * *err must be NULL on entry. */

static int releases = 0;
static void count_release(void* user_data) {
  CHECK(user_data == (void*)&releases);
  releases++;
}

/* The error object stays the one it was: same pointer, code, message and context. */
typedef struct {
  dsd_error* err;
  const dsd_error* was;
  dsd_status code;
  const char* message;
  char saved[256];
} HeldError;

static void expect_untouched(const HeldError* h, dsd_status got, const char* what, int line) {
  if (got != DSD_E_INVALID_ARGUMENT) {
    fprintf(stderr, "%s:%d: %s with a non-NULL *err returned %s, expected invalid_argument\n", __FILE__,
            line, what, dsd_status_name(got));
    check_failures++;
  }
  if (h->err != h->was || dsd_error_code(h->err) != h->code || dsd_error_message(h->err) != h->message ||
      strcmp(dsd_error_message(h->err), h->saved) != 0) {
    fprintf(stderr, "%s:%d: %s replaced or changed the error already in *err\n", __FILE__, line, what);
    check_failures++;
  }
}

#define EXPECT_NOTHING_DONE(held, call) \
  expect_untouched(&(held), (call), #call, __LINE__)

static void check_err_must_be_null_on_entry(Fixture* f) {
  HeldError h = {0};
  size_t at = 0;
  CHECK(dsd_state_dict_find(f->sd, "missing", &at, &h.err) == DSD_E_NOT_FOUND);
  CHECK(h.err != NULL);
  if (h.err == NULL) return;
  h.was = h.err;
  h.code = dsd_error_code(h.err);
  h.message = dsd_error_message(h.err);
  snprintf(h.saved, sizeof h.saved, "%s", h.message);
  CHECK(h.code == DSD_E_NOT_FOUND && strstr(h.saved, "missing") != NULL);

  /* A constructor leaves *out alone. */
  dsd_state_dict* out = f->model_sd;
  EXPECT_NOTHING_DONE(h, dsd_state_dict_new(&out, &h.err));
  CHECK(out == f->model_sd);
  dsd_comm* comm = NULL;
  EXPECT_NOTHING_DONE(h, dsd_comm_new_local(&comm, &h.err));
  CHECK(comm == NULL);

  /* A writer adds nothing. */
  size_t n_before = 0, n_after = 0;
  CHECK_OK(dsd_state_dict_size(f->sd, &n_before, ERR));
  EXPECT_NOTHING_DONE(h, dsd_state_dict_set_int(f->sd, "added", 1, &h.err));
  CHECK_OK(dsd_state_dict_size(f->sd, &n_after, ERR));
  CHECK(n_after == n_before);
  EXPECT_ERROR(DSD_E_NOT_FOUND, "'added'", dsd_state_dict_find(f->sd, "added", &at, ERR));

  /* A reader writes no output. */
  size_t n = 12345;
  EXPECT_NOTHING_DONE(h, dsd_state_dict_size(f->sd, &n, &h.err));
  CHECK(n == 12345);

  /* A call that would fail for another reason reports the err rule, not its own error. */
  EXPECT_NOTHING_DONE(h, dsd_state_dict_find(f->sd, "missing", &at, &h.err));
  EXPECT_NOTHING_DONE(h, dsd_state_dict_size(NULL, &n, &h.err));

  /* A release releases nothing. */
  dsd_tensor t = wrap(f->w);
  EXPECT_NOTHING_DONE(h, dsd_tensor_release(t, &h.err));
  dsd_tensor_info info;
  CHECK_OK(dsd_tensor_info_get(t, &info, ERR)); /* still alive */
  CHECK_OK(dsd_tensor_release(t, ERR));

  /* What a call takes ownership of it still takes: the release callback of lent memory and
   * the deleter of a DLPack tensor run once, and no handle is made. */
  const int64_t shape[1] = {4};
  const dsd_device cpu = {DSD_DEVICE_CPU, 0};
  dsd_tensor not_made = {0};
  releases = 0;
  EXPECT_NOTHING_DONE(h, dsd_tensor_from_blob(f->w, DSD_DTYPE_F32, shape, 1, NULL, cpu, false,
                                              count_release, &releases, &not_made, &h.err));
  CHECK(releases == 1 && not_made.bits == 0);
  dsd_tensor lent;
  CHECK_OK(dsd_tensor_from_blob(f->w, DSD_DTYPE_F32, shape, 1, NULL, cpu, false, count_release,
                                &releases, &lent, ERR));
  struct DLManagedTensor* exported = NULL;
  CHECK_OK(dsd_tensor_to_dlpack(lent, &exported, ERR));
  CHECK_OK(dsd_tensor_release(lent, ERR));
  CHECK(releases == 1); /* the export still refers to the memory */
  EXPECT_NOTHING_DONE(h, dsd_tensor_from_dlpack(exported, &not_made, &h.err));
  CHECK(releases == 2 && not_made.bits == 0);

  /* A save writes nothing. */
  const char* path = fresh_path(f, "not_saved");
  EXPECT_NOTHING_DONE(h, dsd_checkpoint_save(NULL, f->sd, path, NULL, &h.err));
  CHECK(access(path, F_OK) != 0);

  /* The same calls with a fresh NULL error object work. */
  dsd_state_dict* fresh = NULL;
  CHECK_OK(dsd_state_dict_new(&fresh, ERR));
  dsd_state_dict_release(fresh);
  dsd_error_free(h.err);
}

/* ------------------------------------------------------------------------------------------
 * Option structs: one table, one helper. */

typedef struct {
  const char* name; /* the struct, as error messages name it */
  const char* via;  /* the function the row calls */
  size_t size;      /* sizeof the struct in this header */
  void (*init)(void* options);
  dsd_status (*call)(Fixture* f, const void* options, dsd_error** err);
} OptionRow;

static void init_comm(void* o) { dsd_comm_options_init(o); }
static void init_state_dict(void* o) { dsd_state_dict_options_init(o); }
static void init_save(void* o) { dsd_checkpoint_save_options_init(o); }
static void init_load(void* o) { dsd_checkpoint_load_options_init(o); }
static void init_convert(void* o) { dsd_format_convert_options_init(o); }

static dsd_status via_file_store(Fixture* f, const void* o, dsd_error** err) {
  const char* path = fresh_path(f, "store");
  dsd_comm* comm = NULL;
  const dsd_status st = dsd_comm_new_file_store(path, 0, 1, o, &comm, err);
  if (st == DSD_OK) {
    int32_t size = 0;
    CHECK_OK(dsd_comm_size(comm, &size, ERR));
    CHECK(size == 1);
  }
  dsd_comm_release(comm);
  return st;
}

static dsd_status via_get_model_state_dict(Fixture* f, const void* o, dsd_error** err) {
  dsd_state_dict* out = NULL;
  const dsd_status st = dsd_get_model_state_dict(f->model, o, &out, err);
  if (st == DSD_OK) {
    size_t at = 0;
    CHECK_OK(dsd_state_dict_find(out, "w", &at, ERR));
  }
  dsd_state_dict_release(out);
  return st;
}

static dsd_status via_set_model_state_dict(Fixture* f, const void* o, dsd_error** err) {
  return dsd_set_model_state_dict(f->model, f->model_sd, o, NULL, err);
}

static dsd_status via_checkpoint_save(Fixture* f, const void* o, dsd_error** err) {
  const char* path = fresh_path(f, "saved");
  const dsd_status st = dsd_checkpoint_save(NULL, f->sd, path, o, err);
  if (st == DSD_OK) CHECK_OK(dsd_checkpoint_verify(path, ERR));
  return st;
}

static dsd_status via_checkpoint_save_async(Fixture* f, const void* o, dsd_error** err) {
  dsd_future* future = NULL;
  dsd_status st = dsd_checkpoint_save_async(f->saver, f->sd, fresh_path(f, "async"), o, &future, err);
  if (st == DSD_OK) st = dsd_future_wait(future, -1, err);
  dsd_future_free(future);
  return st;
}

static dsd_status via_manager_save(Fixture* f, const void* o, dsd_error** err) {
  return dsd_checkpoint_manager_save(f->manager, f->sd, f->manager_step++, o, err);
}

static dsd_status via_checkpoint_load(Fixture* f, const void* o, dsd_error** err) {
  return dsd_checkpoint_load(NULL, f->sd, f->ckpt, o, NULL, err);
}

static dsd_status via_manager_load_latest(Fixture* f, const void* o, dsd_error** err) {
  bool found = false;
  int64_t step = -1;
  const dsd_status st = dsd_checkpoint_manager_load_latest(f->manager, f->sd, o, &found, &step, err);
  if (st == DSD_OK) CHECK(found && step > 0);
  return st;
}

static dsd_status via_torch_save_export(Fixture* f, const void* o, dsd_error** err) {
  return dsd_torch_save_export(f->sd, fresh_path(f, "export.pt"), o, err);
}

static dsd_status via_safetensors_export(Fixture* f, const void* o, dsd_error** err) {
  return dsd_safetensors_export(f->sd, fresh_path(f, "safetensors"), o, err);
}

static dsd_status via_format_convert(Fixture* f, const void* o, dsd_error** err) {
  return dsd_format_convert(f->ckpt, fresh_path(f, "converted.pt"), DSD_FORMAT_TORCH, o, err);
}

#define ROW(type, init, call) {#type, #call, sizeof(type), init, call}
static const OptionRow kOptionRows[] = {
    ROW(dsd_comm_options, init_comm, via_file_store),
    ROW(dsd_state_dict_options, init_state_dict, via_get_model_state_dict),
    ROW(dsd_state_dict_options, init_state_dict, via_set_model_state_dict),
    ROW(dsd_checkpoint_save_options, init_save, via_checkpoint_save),
    ROW(dsd_checkpoint_save_options, init_save, via_checkpoint_save_async),
    ROW(dsd_checkpoint_save_options, init_save, via_manager_save),
    ROW(dsd_checkpoint_load_options, init_load, via_checkpoint_load),
    ROW(dsd_checkpoint_load_options, init_load, via_manager_load_latest),
    ROW(dsd_format_convert_options, init_convert, via_torch_save_export),
    ROW(dsd_format_convert_options, init_convert, via_safetensors_export),
    ROW(dsd_format_convert_options, init_convert, via_format_convert),
};

enum { kTail = 16 };

/* Runs the row's call on `options`; checks the status, and for an error that the message
 * names the struct. */
static void expect_row(Fixture* f, const OptionRow* row, const char* what, const void* options,
                       dsd_status want) {
  dsd_error* err = NULL;
  const dsd_status got = row->call(f, options, &err);
  if (got != want) {
    fprintf(stderr, "%s:%d: %s through %s, %s: returned %s, expected %s (%s)\n", __FILE__, __LINE__,
            row->name, row->via, what, dsd_status_name(got), dsd_status_name(want), dsd_error_message(err));
    check_failures++;
  } else if (want != DSD_OK && (err == NULL || dsd_error_code(err) != want ||
                                strstr(dsd_error_message(err), row->name) == NULL)) {
    fprintf(stderr, "%s:%d: %s through %s, %s: the error '%s' does not name the struct\n", __FILE__,
            __LINE__, row->name, row->via, what, dsd_error_message(err));
    check_failures++;
  }
  dsd_error_free(err);
}

static void set_struct_size(unsigned char* bytes, size_t size) {
  const uint32_t v = (uint32_t)size;
  memcpy(bytes, &v, sizeof v); /* struct_size is every option struct's first field */
}

static void check_option_row(Fixture* f, const OptionRow* row) {
  /* The struct and the tail a newer header would add, aligned for any field. */
  alignas(max_align_t) unsigned char bytes[256];
  CHECK(row->size + kTail <= sizeof bytes);
  uint32_t init_size = 0;
  memset(bytes, 0, sizeof bytes);
  row->init(bytes);
  memcpy(&init_size, bytes, sizeof init_size);
  CHECK(init_size == row->size); /* the _init function sets struct_size */

  expect_row(f, row, "NULL (the defaults)", NULL, DSD_OK);
  expect_row(f, row, "struct_size = sizeof", bytes, DSD_OK);

  set_struct_size(bytes, row->size + kTail);
  expect_row(f, row, "sizeof + 16 zero bytes", bytes, DSD_OK);
  bytes[row->size] = 1;
  expect_row(f, row, "a non-zero first byte past sizeof", bytes, DSD_E_UNSUPPORTED);
  bytes[row->size] = 0;
  bytes[row->size + kTail - 1] = 0x80;
  expect_row(f, row, "a non-zero last byte of the tail", bytes, DSD_E_UNSUPPORTED);
  bytes[row->size + kTail - 1] = 0;

  set_struct_size(bytes, 0);
  expect_row(f, row, "struct_size 0", bytes, DSD_E_INVALID_ARGUMENT);
  set_struct_size(bytes, row->size - 1);
  expect_row(f, row, "struct_size = sizeof - 1", bytes, DSD_E_INVALID_ARGUMENT);
}

static void check_option_structs(Fixture* f) {
  for (size_t i = 0; i < sizeof kOptionRows / sizeof kOptionRows[0]; ++i) check_option_row(f, &kOptionRows[i]);
}

/* dsd_format_convert_options of the first 1.0 header ended at max_shard_size (24 bytes):
 * such a caller's struct is read without a byte past it (here a wild select pointer, were
 * it read), and select, strip_prefix and dtype keep their defaults. The fields themselves:
 * select "w" with a cast to bfloat16 writes "w" alone, in bfloat16 ("step" left out). */
static void check_convert_options_versions(Fixture* f) {
  enum { kFirstSize = 24 };
  alignas(max_align_t) unsigned char bytes[sizeof(dsd_format_convert_options)];
  dsd_format_convert_options_init((dsd_format_convert_options*)bytes);
  memset(bytes + kFirstSize, 0xA5, sizeof bytes - kFirstSize);
  set_struct_size(bytes, kFirstSize);
  const char* all = fresh_path(f, "first_size.pt");
  CHECK_OK(dsd_format_convert(f->ckpt, all, DSD_FORMAT_TORCH, (const dsd_format_convert_options*)bytes, ERR));
  dsd_state_dict* back = NULL;
  size_t n = 0, at = 0;
  CHECK_OK(dsd_torch_save_import(all, &back, ERR));
  CHECK_OK(dsd_state_dict_size(back, &n, ERR));
  CHECK(n == 2);
  dsd_state_dict_release(back);
  set_struct_size(bytes, kFirstSize + 8);
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "struct_size",
               dsd_format_convert(f->ckpt, fresh_path(f, "between.pt"), DSD_FORMAT_TORCH,
                                  (const dsd_format_convert_options*)bytes, ERR));

  dsd_format_convert_options o;
  dsd_format_convert_options_init(&o);
  CHECK(o.select == NULL && !o.strip_prefix && o.dtype == 0);
  o.select = "w";
  o.dtype = DSD_DTYPE_BF16;
  const char* cast = fresh_path(f, "cast.pt");
  CHECK_OK(dsd_format_convert(f->ckpt, cast, DSD_FORMAT_TORCH, &o, ERR));
  CHECK_OK(dsd_torch_save_import(cast, &back, ERR));
  CHECK_OK(dsd_state_dict_size(back, &n, ERR));
  CHECK(n == 1);
  CHECK_OK(dsd_state_dict_find(back, "w", &at, ERR));
  dsd_tensor t = {0};
  dsd_tensor_info info;
  CHECK_OK(dsd_state_dict_get_tensor(back, at, &t, ERR));
  CHECK_OK(dsd_tensor_info_get(t, &info, ERR));
  CHECK(info.dtype == DSD_DTYPE_BF16);
  CHECK_OK(dsd_tensor_release(t, ERR));
  dsd_state_dict_release(back);

  o.dtype = DSD_DTYPE_I32;
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "int32", dsd_format_convert(f->ckpt, fresh_path(f, "int.pt"), DSD_FORMAT_TORCH, &o, ERR));
  o.dtype = 99;
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "dtype 99", dsd_format_convert(f->ckpt, fresh_path(f, "bad.pt"), DSD_FORMAT_TORCH, &o, ERR));
  o.dtype = 0;
  o.select = "nope";
  EXPECT_ERROR(DSD_E_NOT_FOUND, "nope", dsd_format_convert(f->ckpt, fresh_path(f, "nope.pt"), DSD_FORMAT_TORCH, &o, ERR));
  o.select = NULL;
  o.strip_prefix = true;
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "strip_prefix", dsd_format_convert(f->ckpt, fresh_path(f, "strip.pt"), DSD_FORMAT_TORCH, &o, ERR));
}

/* ------------------------------------------------------------------------------------------
 * 0 is never an enumeration value. */

static void check_zero_is_no_enum_value(Fixture* f) {
  dsd_checkpoint_save_options so;
  dsd_checkpoint_save_options_init(&so);
  CHECK(so.format == DSD_FORMAT_DSD);
  so.format = 0;
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "format", dsd_checkpoint_save(NULL, f->sd, fresh_path(f, "zero_format"), &so, ERR));
  CHECK(access(f->path, F_OK) != 0);
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, NULL,
               dsd_format_convert(f->ckpt, fresh_path(f, "zero_to"), 0, NULL, ERR));

  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, NULL, dsd_model_declare_wrapper(f->model, "", 0, ERR));
  CHECK_OK(dsd_model_declare_wrapper(f->model, "", DSD_WRAPPER_COMPILE, ERR));

  dsd_comm* comm = NULL;
  CHECK_OK(dsd_comm_new_local(&comm, ERR));
  const int64_t one[1] = {1};
  dsd_mesh* mesh = NULL;
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "unknown device type 0", dsd_mesh_new(comm, one, 1, NULL, 0, 0, &mesh, ERR));
  CHECK_OK(dsd_mesh_new(comm, one, 1, NULL, 0, DSD_DEVICE_CPU, &mesh, ERR));
  const int64_t global[1] = {4};
  const dsd_placement zero_kind = {0, 0};
  dsd_layout l;
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "unknown kind 0",
               dsd_layout_new_placements(mesh, global, 1, &zero_kind, 1, &l, ERR));
  dsd_mesh_release(mesh);
  dsd_comm_release(comm);

  float x = 0;
  const int64_t shape[1] = {1};
  dsd_tensor t;
  EXPECT_ERROR(DSD_E_DTYPE_MISMATCH, "unknown dtype",
               dsd_tensor_from_blob(&x, 0, shape, 1, NULL, (dsd_device){DSD_DEVICE_CPU, 0}, false, NULL, NULL, &t, ERR));
  EXPECT_ERROR(DSD_E_DEVICE, "device type",
               dsd_tensor_from_blob(&x, DSD_DTYPE_F32, shape, 1, NULL, (dsd_device){0, 0}, false, NULL, NULL, &t, ERR));

  /* A key list 0, on a real result. */
  dsd_incompatible_keys* keys = NULL;
  CHECK_OK(dsd_set_model_state_dict(f->model, f->model_sd, NULL, &keys, ERR));
  size_t count = 99;
  CHECK_OK(dsd_incompatible_keys_count(keys, DSD_KEYS_MISSING, &count, ERR));
  CHECK(count == 0);
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, NULL, dsd_incompatible_keys_count(keys, 0, &count, ERR));
  dsd_incompatible_keys_free(keys);
}

int main(void) {
  Fixture f;
  fixture_init(&f);
  check_err_must_be_null_on_entry(&f);
  check_option_structs(&f);
  check_convert_options_versions(&f);
  check_zero_is_no_enum_value(&f);
  fixture_free(&f);
  CHECK_DONE();
}

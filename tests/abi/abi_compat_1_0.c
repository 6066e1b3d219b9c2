/* Programs linked against ABI 1.0 and 1.1 keep working with this library.
 *
 * 1.1 grew two option structs (dsd_checkpoint_save_options: 32 -> 40 bytes,
 * dsd_format_convert_options: 24 -> 40 bytes), and 1.2 grew them again (-> 56 and 48). A 1.0 program's struct is the old size, so the
 * _init it calls must not write past it: the 1.0 symbols (dsd_<x>_options_init@DSD_1,
 * capi/dsd.map) fill the old prefix only and set the old struct_size, and every function reads
 * such a struct with the new fields at their defaults. What a 1.0 binary would do is done here
 * through dlvsym(), which binds a name at a given version as the dynamic linker binds the
 * undefined symbols of a program linked against 1.0. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <unistd.h>

#include "check.h"

typedef void (*init_fn)(void*);

/* A bigger buffer than either struct, filled with a canary byte. */
typedef struct {
  _Alignas(8) unsigned char bytes[128];
} Buffer;

static init_fn versioned(const char* name, const char* version) {
  void* f = dlvsym(RTLD_DEFAULT, name, version);
  if (f == NULL) {
    fprintf(stderr, "no %s@%s in the process: %s\n", name, version, dlerror());
    check_failures++;
  }
  init_fn fn;
  memcpy(&fn, &f, sizeof fn);
  return fn;
}

/* `init@version` fills `size` bytes and nothing after, and sets struct_size to it. */
static void check_prefix(const char* name, const char* version, init_fn fn, size_t size) {
  Buffer b;
  memset(b.bytes, 0xAB, sizeof b.bytes);
  fn(b.bytes);
  uint32_t got;
  memcpy(&got, b.bytes, sizeof got);
  if (got != size) {
    fprintf(stderr, "%s@%s set struct_size %u, expected %zu\n", name, version, got, size);
    check_failures++;
  }
  for (size_t i = size; i < sizeof b.bytes; ++i) {
    if (b.bytes[i] != 0xAB) {
      fprintf(stderr, "%s@%s wrote byte %zu of a %zu-byte struct\n", name, version, i, size);
      check_failures++;
      break;
    }
  }
}

/* The 1.0 and 1.1 inits fill their versions' sizes only; the 1.2 init (the default version,
 * which the name resolves to at link time) fills the whole struct. */
static void check_init(const char* name, init_fn linked, size_t size_1_0, size_t size_1_1, size_t size_1_2) {
  const init_fn v1_0 = versioned(name, "DSD_1");
  const init_fn v1_1 = versioned(name, "DSD_1.1");
  const init_fn v1_2 = versioned(name, "DSD_1.2");
  if (v1_0 == NULL || v1_1 == NULL || v1_2 == NULL) return;
  CHECK(v1_0 != v1_1 && v1_1 != v1_2 && v1_0 != v1_2);
  CHECK(v1_2 == linked);
  check_prefix(name, "DSD_1", v1_0, size_1_0);
  check_prefix(name, "DSD_1.1", v1_1, size_1_1);
  check_prefix(name, "DSD_1.2", v1_2, size_1_2);
}

int main(void) {
  check_init("dsd_checkpoint_save_options_init", (init_fn)(void (*)(dsd_checkpoint_save_options*))dsd_checkpoint_save_options_init,
             32, 40, sizeof(dsd_checkpoint_save_options));
  check_init("dsd_format_convert_options_init", (init_fn)(void (*)(dsd_format_convert_options*))dsd_format_convert_options_init,
             24, 40, sizeof(dsd_format_convert_options));

  /* A 1.0 program's options, as its init left them, are read: a save and a conversion. */
  char dir[64];
  snprintf(dir, sizeof dir, "/tmp/dsd_abi_compat_XXXXXX");
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    return 1;
  }
  float w[4] = {1, 2, 3, 4};
  const int64_t shape[1] = {4};
  dsd_tensor t = {0};
  CHECK_OK(dsd_tensor_from_blob(w, DSD_DTYPE_F32, shape, 1, NULL, (dsd_device){DSD_DEVICE_CPU, 0}, false,
                                NULL, NULL, &t, ERR));
  dsd_state_dict* sd = NULL;
  CHECK_OK(dsd_state_dict_new(&sd, ERR));
  CHECK_OK(dsd_state_dict_set_tensor(sd, "w", t, ERR));

  const init_fn save_1_0 = versioned("dsd_checkpoint_save_options_init", "DSD_1");
  const init_fn convert_1_0 = versioned("dsd_format_convert_options_init", "DSD_1");
  if (save_1_0 != NULL && convert_1_0 != NULL) {
    Buffer so;
    memset(so.bytes, 0xAB, sizeof so.bytes);  /* the canary stands for the caller's next variable */
    save_1_0(so.bytes);
    char ckpt[128], out[160];
    snprintf(ckpt, sizeof ckpt, "%s/ckpt", dir);
    CHECK_OK(dsd_checkpoint_save(NULL, sd, ckpt, (const dsd_checkpoint_save_options*)(void*)so.bytes, ERR));
    /* Sizes between the versions are no version at all. */
    const uint32_t between = 36;
    memcpy(so.bytes, &between, sizeof between);
    EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "struct_size",
                 dsd_checkpoint_save(NULL, sd, ckpt, (const dsd_checkpoint_save_options*)(void*)so.bytes, ERR));

    Buffer co;
    memset(co.bytes, 0xAB, sizeof co.bytes);
    convert_1_0(co.bytes);
    snprintf(out, sizeof out, "%s/w.safetensors", dir);
    CHECK_OK(dsd_format_convert(ckpt, out, DSD_FORMAT_SAFETENSORS, (const dsd_format_convert_options*)(void*)co.bytes,
                                ERR));
    CHECK(access(out, F_OK) == 0);

    /* A 1.1 program's save options: read with base and incremental at their defaults. */
    const init_fn save_1_1 = versioned("dsd_checkpoint_save_options_init", "DSD_1.1");
    if (save_1_1 != NULL) {
      memset(so.bytes, 0xAB, sizeof so.bytes);
      save_1_1(so.bytes);
      char ckpt2[128];
      snprintf(ckpt2, sizeof ckpt2, "%s/ckpt_1_1", dir);
      CHECK_OK(dsd_checkpoint_save(NULL, sd, ckpt2, (const dsd_checkpoint_save_options*)(void*)so.bytes, ERR));
    }
  }

  dsd_state_dict_release(sd);
  CHECK_OK(dsd_tensor_release(t, ERR));
  char cmd[96];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) check_failures++;
  CHECK_DONE();
}

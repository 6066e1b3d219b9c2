/* Programs linked against ABI 1.0 keep working with this library.
 *
 * 1.1 grew two option structs (dsd_checkpoint_save_options: 32 -> 40 bytes,
 * dsd_format_convert_options: 24 -> 48 bytes). A 1.0 program's struct is the old size, so the
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

/* The 1.0 init fills `old_size` bytes and nothing after; the 1.1 init (the default version,
 * which the name resolves to at link time) fills the whole struct. */
static void check_init(const char* name, init_fn linked, size_t old_size, size_t new_size) {
  const init_fn v1_0 = versioned(name, "DSD_1");
  const init_fn v1_1 = versioned(name, "DSD_1.1");
  if (v1_0 == NULL || v1_1 == NULL) return;
  CHECK(v1_0 != v1_1);
  CHECK(v1_1 == linked);

  Buffer b;
  memset(b.bytes, 0xAB, sizeof b.bytes);
  v1_0(b.bytes);
  uint32_t size;
  memcpy(&size, b.bytes, sizeof size);
  if (size != old_size) {
    fprintf(stderr, "%s@DSD_1 set struct_size %u, expected %zu\n", name, size, old_size);
    check_failures++;
  }
  for (size_t i = old_size; i < sizeof b.bytes; ++i) {
    if (b.bytes[i] != 0xAB) {
      fprintf(stderr, "%s@DSD_1 wrote byte %zu of a %zu-byte 1.0 struct\n", name, i, old_size);
      check_failures++;
      break;
    }
  }

  memset(b.bytes, 0xAB, sizeof b.bytes);
  v1_1(b.bytes);
  memcpy(&size, b.bytes, sizeof size);
  CHECK(size == new_size);
  CHECK(b.bytes[new_size] == 0xAB);
}

int main(void) {
  check_init("dsd_checkpoint_save_options_init", (init_fn)(void (*)(dsd_checkpoint_save_options*))dsd_checkpoint_save_options_init,
             32, sizeof(dsd_checkpoint_save_options));
  check_init("dsd_format_convert_options_init", (init_fn)(void (*)(dsd_format_convert_options*))dsd_format_convert_options_init,
             24, sizeof(dsd_format_convert_options));

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
  }

  dsd_state_dict_release(sd);
  CHECK_OK(dsd_tensor_release(t, ERR));
  char cmd[96];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) check_failures++;
  CHECK_DONE();
}

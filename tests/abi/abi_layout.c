/* Communicators, meshes and layouts through dsd.h, in one process: a local communicator and a
 * one-rank file store, mesh validation, layouts (placements, explicit chunks, introspection),
 * distributed tensors in state dicts, reference counting of communicators and meshes, and
 * every kind of layout-handle misuse: stale, double release, zeroed, and a tensor handle
 * passed as a layout and vice versa. */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <unistd.h>

#include "check.h"

static dsd_comm* local_comm(void) {
  dsd_comm* c = NULL;
  CHECK_OK(dsd_comm_new_local(&c, ERR));
  return c;
}

static void check_options_and_file_store(void) {
  dsd_comm_options o;
  dsd_comm_options_init(&o);
  CHECK(o.struct_size == sizeof(dsd_comm_options));
  CHECK(o.timeout_ms == 1800000);
  dsd_comm_options_init(NULL); /* a no-op */

  char path[] = "/tmp/dsd_abi_layout_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  close(fd);
  unlink(path); /* the store creates it */
  dsd_comm* c = NULL;
  o.timeout_ms = 0;
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "timeout_ms must be positive",
               dsd_comm_new_file_store(path, 0, 1, &o, &c, ERR));
  dsd_comm_options_init(&o);
  o.struct_size = 4;
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "dsd_comm_options_init", dsd_comm_new_file_store(path, 0, 1, &o, &c, ERR));
  /* A caller built against a newer, larger struct: fine while the unknown tail is zero. */
  struct {
    dsd_comm_options base;
    int64_t newer_field;
  } bigger;
  dsd_comm_options_init(&bigger.base);
  bigger.base.struct_size = sizeof(bigger);
  bigger.newer_field = 7;
  EXPECT_ERROR(DSD_E_UNSUPPORTED, "does not know", dsd_comm_new_file_store(path, 0, 1, &bigger.base, &c, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "rank 1 is outside a world of 1",
               dsd_comm_new_file_store(path, 1, 1, NULL, &c, ERR));
  bigger.newer_field = 0;
  CHECK_OK(dsd_comm_new_file_store(path, 0, 1, &bigger.base, &c, ERR));
  int32_t rank = -1, size = -1;
  const char* backend = NULL;
  CHECK_OK(dsd_comm_rank(c, &rank, ERR));
  CHECK_OK(dsd_comm_size(c, &size, ERR));
  CHECK_OK(dsd_comm_backend(c, &backend, ERR));
  CHECK(rank == 0 && size == 1 && strcmp(backend, "gloo") == 0);
  CHECK_OK(dsd_comm_barrier(c, ERR));
  dsd_comm_release(c);
  dsd_comm_release(NULL);
  unlink(path);

  /* No launcher: the error names the variables. */
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
  unsetenv("OMPI_COMM_WORLD_RANK");
  unsetenv("OMPI_COMM_WORLD_SIZE");
  unsetenv("SLURM_PROCID");
  unsetenv("SLURM_NTASKS");
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "RANK and WORLD_SIZE are not set", dsd_comm_new_from_env(NULL, &c, ERR));
  setenv("RANK", "0", 1);
  setenv("WORLD_SIZE", "two", 1);
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "WORLD_SIZE is 'two', not an integer", dsd_comm_new_from_env(NULL, &c, ERR));
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
}

static void check_meshes(dsd_comm* comm) {
  dsd_mesh* m = NULL;
  const int64_t one[1] = {1};
  const int64_t two_by_two[2] = {2, 2};
  const int32_t bad_rank[1] = {3}, zero_twice[2] = {0, 0}, rank0[1] = {0};
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "at least one dimension", dsd_mesh_new(comm, one, 0, NULL, 0, DSD_DEVICE_CPU, &m, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "outside a world of 1", dsd_mesh_new(comm, one, 1, bad_rank, 1, DSD_DEVICE_CPU, &m, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "outside a world of 1", dsd_mesh_new(comm, two_by_two, 2, NULL, 0, DSD_DEVICE_CPU, &m, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "unknown device type 7", dsd_mesh_new(comm, one, 1, NULL, 0, 7, &m, ERR));
  /* A rank count that is not the product of the sizes. */
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, NULL, dsd_mesh_new(comm, one, 1, zero_twice, 2, DSD_DEVICE_CPU, &m, ERR));
  CHECK_OK(dsd_mesh_new(comm, one, 1, rank0, 1, DSD_DEVICE_CPU, &m, ERR)); /* explicit ranks */
  dsd_mesh_release(m);
  CHECK_OK(dsd_mesh_new(comm, one, 1, NULL, 0, DSD_DEVICE_CUDA, &m, ERR));
  size_t ndim = 0;
  int64_t shape[4] = {0}, coord[4] = {-1};
  int32_t ranks[4] = {-1};
  dsd_device_type type = 0;
  bool in_mesh = false;
  CHECK_OK(dsd_mesh_ndim(m, &ndim, ERR));
  CHECK_OK(dsd_mesh_shape(m, shape, 4, ERR));
  CHECK_OK(dsd_mesh_ranks(m, ranks, 4, ERR));
  CHECK_OK(dsd_mesh_device_type(m, &type, ERR));
  CHECK_OK(dsd_mesh_coordinate(m, &in_mesh, coord, 4, ERR));
  CHECK(ndim == 1 && shape[0] == 1 && ranks[0] == 0 && type == DSD_DEVICE_CUDA && in_mesh && coord[0] == 0);
  EXPECT_ERROR(DSD_E_BUFFER_TOO_SMALL, "needs room for 1", dsd_mesh_shape(m, shape, 0, ERR));
  EXPECT_ERROR(DSD_E_BUFFER_TOO_SMALL, NULL, dsd_mesh_ranks(m, ranks, 0, ERR));
  EXPECT_ERROR(DSD_E_BUFFER_TOO_SMALL, NULL, dsd_mesh_coordinate(m, &in_mesh, coord, 0, ERR));
  dsd_mesh_release(m);
  dsd_mesh_release(NULL);
}

static void check_layouts(dsd_comm* comm) {
  dsd_mesh* mesh = NULL;
  const int64_t one[1] = {1};
  CHECK_OK(dsd_mesh_new(comm, one, 1, NULL, 0, DSD_DEVICE_CPU, &mesh, ERR));
  const int64_t global[2] = {7, 3};
  dsd_placement shard1 = {DSD_PLACEMENT_SHARD, 1};
  dsd_layout l = {0};
  CHECK_OK(dsd_layout_new_placements(mesh, global, 2, &shard1, 1, &l, ERR));
  int64_t offs[4] = {-1, -1}, sizes[4] = {-1, -1}, gs[4] = {0};
  size_t ndim = 0;
  bool is_chunk = true;
  dsd_placement ps[2] = {{9, 9}, {9, 9}};
  CHECK_OK(dsd_layout_local_chunk(l, offs, sizes, 4, ERR));
  CHECK(offs[0] == 0 && offs[1] == 0 && sizes[0] == 7 && sizes[1] == 3);
  CHECK_OK(dsd_layout_ndim(l, &ndim, ERR));
  CHECK_OK(dsd_layout_global_shape(l, gs, 4, ERR));
  CHECK(ndim == 2 && gs[0] == 7 && gs[1] == 3);
  CHECK_OK(dsd_layout_is_chunk(l, &is_chunk, ERR));
  CHECK(!is_chunk);
  CHECK_OK(dsd_layout_placements(l, ps, 2, ERR));
  CHECK(ps[0].kind == DSD_PLACEMENT_SHARD && ps[0].dim == 1 && ps[1].kind == 9);
  EXPECT_ERROR(DSD_E_BUFFER_TOO_SMALL, NULL, dsd_layout_local_chunk(l, offs, sizes, 1, ERR));
  dsd_mesh* back = NULL;
  CHECK_OK(dsd_layout_mesh(l, &back, ERR));
  dsd_mesh_release(back);

  /* Bad layouts. */
  dsd_layout bad;
  dsd_placement shard2 = {DSD_PLACEMENT_SHARD, 2};
  dsd_placement unknown = {5, 0};
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "Shard(2) is outside a 2-d tensor",
               dsd_layout_new_placements(mesh, global, 2, &shard2, 1, &bad, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "unknown kind 5", dsd_layout_new_placements(mesh, global, 2, &unknown, 1, &bad, ERR));
  const dsd_placement two[2] = {{DSD_PLACEMENT_SHARD, 0}, {DSD_PLACEMENT_REPLICATE, 0}};
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "2 placements given for a 1-d mesh",
               dsd_layout_new_placements(mesh, global, 2, two, 2, &bad, ERR));

  /* An explicit chunk: rows 2..5 of the 7 x 3 tensor. */
  const int64_t c_off[2] = {2, 0}, c_size[2] = {3, 3}, too_far[2] = {6, 3};
  dsd_layout chunk;
  CHECK_OK(dsd_layout_new_chunk(mesh, global, 2, c_off, c_size, &chunk, ERR));
  CHECK_OK(dsd_layout_local_chunk(chunk, offs, sizes, 2, ERR));
  CHECK(offs[0] == 2 && sizes[0] == 3 && offs[1] == 0 && sizes[1] == 3);
  CHECK_OK(dsd_layout_is_chunk(chunk, &is_chunk, ERR));
  CHECK(is_chunk);
  EXPECT_ERROR(DSD_E_WRONG_KIND, "no placements", dsd_layout_placements(chunk, ps, 2, ERR));
  EXPECT_ERROR(DSD_E_SHAPE_MISMATCH, "outside the global shape",
               dsd_layout_new_chunk(mesh, global, 2, c_off, too_far, &bad, ERR));

  /* A 0-d tensor needs no shape pointer. */
  dsd_layout scalar;
  dsd_placement rep = {DSD_PLACEMENT_REPLICATE, 0};
  CHECK_OK(dsd_layout_new_placements(mesh, NULL, 0, &rep, 1, &scalar, ERR));
  CHECK_OK(dsd_layout_release(scalar, ERR));

  /* Distributed tensors in a state dict. */
  float data[21] = {0};
  const int64_t local_shape[2] = {7, 3}, wrong_shape[2] = {3, 7};
  const dsd_device cpu = {DSD_DEVICE_CPU, 0};
  dsd_tensor t, wrong, rows;
  CHECK_OK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, local_shape, 2, NULL, cpu, false, NULL, NULL, &t, ERR));
  CHECK_OK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, wrong_shape, 2, NULL, cpu, false, NULL, NULL, &wrong, ERR));
  CHECK_OK(dsd_tensor_from_blob(data + 6, DSD_DTYPE_F32, c_size, 2, NULL, cpu, false, NULL, NULL, &rows, ERR));
  dsd_state_dict* sd = NULL;
  CHECK_OK(dsd_state_dict_new(&sd, ERR));
  CHECK_OK(dsd_state_dict_set_tensor(sd, "plain", t, ERR));
  CHECK_OK(dsd_state_dict_set_dist_tensor(sd, "w", t, l, ERR));
  CHECK_OK(dsd_state_dict_set_dist_tensor(sd, "rows", rows, chunk, ERR));
  CHECK_OK(dsd_state_dict_set_int(sd, "step", 3, ERR));
  EXPECT_ERROR(DSD_E_SHAPE_MISMATCH, "local tensor of 'v' has shape [3, 7]",
               dsd_state_dict_set_dist_tensor(sd, "v", wrong, l, ERR));
  size_t n = 0;
  CHECK_OK(dsd_state_dict_size(sd, &n, ERR));
  CHECK(n == 4);
  bool dist = true;
  dsd_kind kind = 0;
  CHECK_OK(dsd_state_dict_is_dist_tensor(sd, 0, &dist, ERR));
  CHECK(!dist);
  CHECK_OK(dsd_state_dict_is_dist_tensor(sd, 1, &dist, ERR));
  CHECK(dist);
  CHECK_OK(dsd_state_dict_is_dist_tensor(sd, 3, &dist, ERR));
  CHECK(!dist);
  CHECK_OK(dsd_state_dict_kind(sd, 1, &kind, ERR));
  CHECK(kind == DSD_KIND_TENSOR);
  EXPECT_ERROR(DSD_E_WRONG_KIND, "'plain' is a plain tensor", dsd_state_dict_get_layout(sd, 0, &bad, ERR));
  EXPECT_ERROR(DSD_E_WRONG_KIND, "'step' is a int", dsd_state_dict_get_layout(sd, 3, &bad, ERR));
  EXPECT_ERROR(DSD_E_INVALID_ARGUMENT, "out of range", dsd_state_dict_get_layout(sd, 4, &bad, ERR));
  dsd_layout got;
  CHECK_OK(dsd_state_dict_get_layout(sd, 2, &got, ERR));
  CHECK_OK(dsd_layout_local_chunk(got, offs, sizes, 2, ERR));
  CHECK(offs[0] == 2 && sizes[0] == 3);
  CHECK_OK(dsd_layout_release(got, ERR));
  dsd_tensor local;
  CHECK_OK(dsd_state_dict_get_tensor(sd, 2, &local, ERR));
  dsd_tensor_info info;
  CHECK_OK(dsd_tensor_info_get(local, &info, ERR));
  CHECK(info.data == (void*)(data + 6)); /* the local tensor itself, not a copy */
  CHECK_OK(dsd_tensor_release(local, ERR));

  /* The state dict keeps its own references: releasing the handles is safe. */
  CHECK_OK(dsd_layout_release(l, ERR));
  CHECK_OK(dsd_layout_release(chunk, ERR));
  CHECK_OK(dsd_state_dict_get_layout(sd, 1, &got, ERR));
  CHECK_OK(dsd_layout_global_shape(got, gs, 2, ERR));
  CHECK(gs[0] == 7 && gs[1] == 3);

  /* Misuse of layout handles. */
  size_t nd;
  dsd_layout stale = l;
  EXPECT_ERROR(DSD_E_STALE_HANDLE, "layout handle", dsd_layout_ndim(stale, &nd, ERR));
  EXPECT_ERROR(DSD_E_STALE_HANDLE, "stale", dsd_layout_release(stale, ERR)); /* double release */
  EXPECT_ERROR(DSD_E_STALE_HANDLE, "stale", dsd_state_dict_set_dist_tensor(sd, "x", t, stale, ERR));
  dsd_layout zero = {0};
  EXPECT_ERROR(DSD_E_STALE_HANDLE, "layout handle is zero", dsd_layout_ndim(zero, &nd, ERR));
  EXPECT_ERROR(DSD_E_STALE_HANDLE, "zero", dsd_layout_release(zero, ERR));
  /* A tensor handle passed as a layout, and a layout handle passed as a tensor. */
  dsd_layout tensor_as_layout = {t.bits};
  EXPECT_ERROR(DSD_E_WRONG_KIND, "expected a layout handle, got a tensor handle",
               dsd_layout_ndim(tensor_as_layout, &nd, ERR));
  EXPECT_ERROR(DSD_E_WRONG_KIND, "expected a layout handle, got a tensor handle",
               dsd_layout_release(tensor_as_layout, ERR));
  EXPECT_ERROR(DSD_E_WRONG_KIND, "expected a layout handle",
               dsd_state_dict_set_dist_tensor(sd, "x", t, tensor_as_layout, ERR));
  dsd_tensor layout_as_tensor = {got.bits};
  EXPECT_ERROR(DSD_E_WRONG_KIND, "expected a tensor handle, got a layout handle",
               dsd_tensor_info_get(layout_as_tensor, &info, ERR));
  EXPECT_ERROR(DSD_E_WRONG_KIND, "expected a tensor handle, got a layout handle",
               dsd_tensor_release(layout_as_tensor, ERR));
  EXPECT_ERROR(DSD_E_WRONG_KIND, "expected a tensor handle",
               dsd_state_dict_set_dist_tensor(sd, "x", layout_as_tensor, got, ERR));
  /* Neither misuse released anything. */
  CHECK_OK(dsd_layout_ndim(got, &nd, ERR));
  CHECK_OK(dsd_tensor_info_get(t, &info, ERR));
  dsd_layout forged = {got.bits + 12345};
  EXPECT_ERROR(DSD_E_STALE_HANDLE, NULL, dsd_layout_ndim(forged, &nd, ERR));
  /* A retained handle outlives the original. */
  dsd_layout again;
  CHECK_OK(dsd_layout_retain(got, &again, ERR));
  CHECK_OK(dsd_layout_release(got, ERR));
  CHECK_OK(dsd_layout_ndim(again, &nd, ERR));
  CHECK_OK(dsd_layout_release(again, ERR));
  EXPECT_ERROR(DSD_E_STALE_HANDLE, NULL, dsd_layout_release(again, ERR));

  CHECK_OK(dsd_tensor_release(t, ERR));
  CHECK_OK(dsd_tensor_release(wrong, ERR));
  CHECK_OK(dsd_tensor_release(rows, ERR));
  dsd_state_dict_release(sd);
  dsd_mesh_release(mesh);
}

/* Communicators and meshes are reference counted: retain returns its argument, and a mesh
 * (and a layout, through its mesh) keeps its communicator alive after the caller's release. */
static void check_retain_release(void) {
  dsd_comm* comm = local_comm();
  CHECK(dsd_comm_retain(comm) == comm);
  dsd_comm_release(comm);
  int32_t rank = -1;
  CHECK_OK(dsd_comm_rank(comm, &rank, ERR)); /* one reference left */
  CHECK(rank == 0);

  const int64_t one[1] = {1};
  dsd_mesh* mesh = NULL;
  CHECK_OK(dsd_mesh_new(comm, one, 1, NULL, 0, DSD_DEVICE_CPU, &mesh, ERR));
  dsd_comm_release(comm); /* the caller's last reference: the mesh still holds one */
  CHECK(dsd_mesh_retain(mesh) == mesh);
  dsd_mesh_release(mesh);
  bool in_mesh = false;
  int64_t coord[1] = {-1};
  CHECK_OK(dsd_mesh_coordinate(mesh, &in_mesh, coord, 1, ERR)); /* asks the communicator */
  CHECK(in_mesh && coord[0] == 0);

  const int64_t global[1] = {4};
  const dsd_placement shard0 = {DSD_PLACEMENT_SHARD, 0};
  dsd_layout l;
  CHECK_OK(dsd_layout_new_placements(mesh, global, 1, &shard0, 1, &l, ERR));
  dsd_mesh_release(mesh); /* the layout holds the mesh, which holds the communicator */
  int64_t offs[1] = {-1}, sizes[1] = {-1};
  CHECK_OK(dsd_layout_local_chunk(l, offs, sizes, 1, ERR));
  CHECK(offs[0] == 0 && sizes[0] == 4);
  dsd_mesh* back = NULL;
  CHECK_OK(dsd_layout_mesh(l, &back, ERR));
  size_t ndim = 0;
  CHECK_OK(dsd_mesh_ndim(back, &ndim, ERR));
  CHECK(ndim == 1);
  CHECK_OK(dsd_layout_release(l, ERR));
  CHECK_OK(dsd_mesh_ndim(back, &ndim, ERR)); /* layout_mesh's reference is the caller's own */
  dsd_mesh_release(back);                     /* the last reference to the mesh and the comm */
}

int main(void) {
  check_options_and_file_store();
  check_retain_release();
  dsd_comm* comm = local_comm();
  int32_t rank = -1, size = -1;
  CHECK_OK(dsd_comm_rank(comm, &rank, ERR));
  CHECK_OK(dsd_comm_size(comm, &size, ERR));
  CHECK(rank == 0 && size == 1);
  CHECK_OK(dsd_comm_barrier(comm, ERR));
  check_meshes(comm);
  check_layouts(comm);
  dsd_comm_release(comm); /* meshes and layouts hold their own references */
  CHECK_DONE();
}

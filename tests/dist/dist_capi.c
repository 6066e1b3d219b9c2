/* The communicator, mesh and layout C ABI across processes (run under dsdrun -n 4): a
 * communicator from the launcher's environment, barriers, a 2 x 2 mesh with the layouts of
 * HSDP and FSDP+TP, a sub-mesh this rank may not be part of, and distributed tensors in a
 * state dict. Every rank checks its own chunk against the values PyTorch's
 * compute_local_shape_and_global_offset gives (tests/dist/test_layout_oracle.py checks the
 * formula itself against PyTorch over many shapes). */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>

#include "../abi/check.h"

static int32_t rank_ = -1;

/* Expects this rank's local chunk of `l` to be offsets `o` and sizes `s` (2-d). */
static void expect_chunk(dsd_layout l, int64_t o0, int64_t o1, int64_t s0, int64_t s1, int line) {
  int64_t offs[2] = {-1, -1}, sizes[2] = {-1, -1};
  CHECK_OK(dsd_layout_local_chunk(l, offs, sizes, 2, ERR));
  if (offs[0] != o0 || offs[1] != o1 || sizes[0] != s0 || sizes[1] != s1) {
    fprintf(stderr, "line %d: rank %d holds offsets (%lld, %lld) sizes (%lld, %lld), expected (%lld, %lld) (%lld, %lld)\n",
            line, rank_, (long long)offs[0], (long long)offs[1], (long long)sizes[0], (long long)sizes[1],
            (long long)o0, (long long)o1, (long long)s0, (long long)s1);
    check_failures++;
  }
}

int main(void) {
  dsd_comm_options o;
  dsd_comm_options_init(&o);
  o.timeout_ms = 20000;
  dsd_comm* comm = NULL;
  CHECK_OK(dsd_comm_new_from_env(&o, &comm, ERR));
  if (comm == NULL) return 1;
  int32_t size = -1;
  CHECK_OK(dsd_comm_rank(comm, &rank_, ERR));
  CHECK_OK(dsd_comm_size(comm, &size, ERR));
  CHECK(rank_ == atoi(getenv("RANK")) && size == 4);
  CHECK_OK(dsd_comm_barrier(comm, ERR));

  /* 2 x 2, ranks laid out as PyTorch's init_device_mesh("cpu", (2, 2)). */
  const int64_t shape[2] = {2, 2};
  dsd_mesh* mesh = NULL;
  CHECK_OK(dsd_mesh_new(comm, shape, 2, NULL, 0, DSD_DEVICE_CPU, &mesh, ERR));
  int64_t coord[2] = {-1, -1};
  bool in_mesh = false;
  CHECK_OK(dsd_mesh_coordinate(mesh, &in_mesh, coord, 2, ERR));
  CHECK(in_mesh && coord[0] == rank_ / 2 && coord[1] == rank_ % 2);
  const int64_t r = coord[0], c = coord[1];

  /* HSDP [Replicate, Shard(0)] of a 7 x 4 tensor: rows 0..4 and 4..7, replicated across r. */
  const int64_t global[2] = {7, 4};
  const dsd_placement hsdp[2] = {{DSD_PLACEMENT_REPLICATE, 0}, {DSD_PLACEMENT_SHARD, 0}};
  dsd_layout l_hsdp;
  CHECK_OK(dsd_layout_new_placements(mesh, global, 2, hsdp, 2, &l_hsdp, ERR));
  expect_chunk(l_hsdp, c == 0 ? 0 : 4, 0, c == 0 ? 4 : 3, 4, __LINE__);

  /* FSDP + TP [Shard(0), Shard(1)] of 7 x 4. */
  const dsd_placement fsdp_tp[2] = {{DSD_PLACEMENT_SHARD, 0}, {DSD_PLACEMENT_SHARD, 1}};
  dsd_layout l_tp;
  CHECK_OK(dsd_layout_new_placements(mesh, global, 2, fsdp_tp, 2, &l_tp, ERR));
  expect_chunk(l_tp, r == 0 ? 0 : 4, 2 * c, r == 0 ? 4 : 3, 2, __LINE__);

  /* [Shard(0), Shard(0)] of a 2 x 4 tensor: dim 0 split in two, then each half in two:
   * rank (0,0) holds row 0, (1,0) row 1, the others nothing (offset = global size). */
  const int64_t small[2] = {2, 4};
  const dsd_placement s0s0[2] = {{DSD_PLACEMENT_SHARD, 0}, {DSD_PLACEMENT_SHARD, 0}};
  dsd_layout l_ss;
  CHECK_OK(dsd_layout_new_placements(mesh, small, 2, s0s0, 2, &l_ss, ERR));
  if (c == 0) {
    expect_chunk(l_ss, r, 0, 1, 4, __LINE__);
  } else {
    expect_chunk(l_ss, 2, 0, 0, 4, __LINE__);
  }

  /* A sub-mesh of ranks 3 and 1 (in that order): ranks 0 and 2 hold nothing. */
  const int64_t sub_shape[1] = {2};
  const int32_t sub_ranks[2] = {3, 1};
  dsd_mesh* sub = NULL;
  CHECK_OK(dsd_mesh_new(comm, sub_shape, 1, sub_ranks, 2, DSD_DEVICE_CPU, &sub, ERR));
  const dsd_placement shard0 = {DSD_PLACEMENT_SHARD, 0};
  dsd_layout l_sub;
  CHECK_OK(dsd_layout_new_placements(sub, global, 2, &shard0, 1, &l_sub, ERR));
  if (rank_ == 3) expect_chunk(l_sub, 0, 0, 4, 4, __LINE__);
  if (rank_ == 1) expect_chunk(l_sub, 4, 0, 3, 4, __LINE__);
  if (rank_ == 0 || rank_ == 2) expect_chunk(l_sub, 0, 0, 0, 0, __LINE__);

  /* Distributed tensors: the FSDP+TP local piece, and nothing for a rank outside the sub-mesh. */
  float data[16] = {0};
  const int64_t tp_shape[2] = {r == 0 ? 4 : 3, 2};
  const int64_t sub_local[2] = {rank_ == 3 ? 4 : (rank_ == 1 ? 3 : 0), 4};
  const dsd_device cpu = {DSD_DEVICE_CPU, 0};
  dsd_tensor t_tp, t_sub;
  CHECK_OK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, tp_shape, 2, NULL, cpu, false, NULL, NULL, &t_tp, ERR));
  CHECK_OK(dsd_tensor_from_blob(data, DSD_DTYPE_F32, sub_local, 2, NULL, cpu, false, NULL, NULL, &t_sub, ERR));
  dsd_state_dict* sd = NULL;
  CHECK_OK(dsd_state_dict_new(&sd, ERR));
  CHECK_OK(dsd_state_dict_set_dist_tensor(sd, "layer.weight", t_tp, l_tp, ERR));
  CHECK_OK(dsd_state_dict_set_dist_tensor(sd, "head.weight", t_sub, l_sub, ERR));
  /* The HSDP chunk has another shape than the FSDP+TP piece on every rank. */
  EXPECT_ERROR(DSD_E_SHAPE_MISMATCH, "local tensor of 'x'", dsd_state_dict_set_dist_tensor(sd, "x", t_tp, l_hsdp, ERR));
  dsd_layout back;
  CHECK_OK(dsd_state_dict_get_layout(sd, 0, &back, ERR));
  dsd_placement ps[2];
  CHECK_OK(dsd_layout_placements(back, ps, 2, ERR));
  CHECK(ps[0].kind == DSD_PLACEMENT_SHARD && ps[0].dim == 0 && ps[1].kind == DSD_PLACEMENT_SHARD && ps[1].dim == 1);
  dsd_mesh* back_mesh = NULL;
  CHECK_OK(dsd_layout_mesh(back, &back_mesh, ERR));
  int32_t ranks[4] = {-1, -1, -1, -1};
  CHECK_OK(dsd_mesh_ranks(back_mesh, ranks, 4, ERR));
  CHECK(ranks[0] == 0 && ranks[1] == 1 && ranks[2] == 2 && ranks[3] == 3);
  dsd_mesh_release(back_mesh);
  CHECK_OK(dsd_layout_release(back, ERR));

  CHECK_OK(dsd_comm_barrier(comm, ERR));
  dsd_state_dict_release(sd);
  CHECK_OK(dsd_tensor_release(t_tp, ERR));
  CHECK_OK(dsd_tensor_release(t_sub, ERR));
  CHECK_OK(dsd_layout_release(l_hsdp, ERR));
  CHECK_OK(dsd_layout_release(l_tp, ERR));
  CHECK_OK(dsd_layout_release(l_ss, ERR));
  CHECK_OK(dsd_layout_release(l_sub, ERR));
  dsd_mesh_release(sub);
  dsd_mesh_release(mesh);
  dsd_comm_release(comm);
  CHECK_DONE();
}

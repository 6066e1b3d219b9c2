#include <gtest/gtest.h>

#include "core/dist/comm.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"

namespace dsd {
namespace {

using V = std::vector<int64_t>;

TEST(ChunkSpan, TorchChunkSemantics) {
  // torch.chunk(arange(7), 4): sizes 2, 2, 2, 1.
  EXPECT_EQ(chunk_span(7, 4, 0).size, 2);
  EXPECT_EQ(chunk_span(7, 4, 3).size, 1);
  EXPECT_EQ(chunk_span(7, 4, 3).offset, 6);
  // torch.chunk(arange(2), 4): sizes 1, 1, 0, 0 with empty pieces at offset 2.
  EXPECT_EQ(chunk_span(2, 4, 1).size, 1);
  EXPECT_EQ(chunk_span(2, 4, 2).size, 0);
  EXPECT_EQ(chunk_span(2, 4, 2).offset, 2);
  // torch.chunk(arange(5), 4): ceil(5/4) = 2 -> 2, 2, 1, 0.
  EXPECT_EQ(chunk_span(5, 4, 2).size, 1);
  EXPECT_EQ(chunk_span(5, 4, 3).size, 0);
  EXPECT_EQ(chunk_span(5, 4, 3).offset, 5);
}

TEST(LocalShapeAndOffset, Fsdp) {
  std::vector<Placement> p{Placement::shard(0)};
  EXPECT_EQ(local_shape_and_offset({7, 3}, {4}, {3}, p), (Chunk{V{6, 0}, V{1, 3}}));
  EXPECT_EQ(local_shape_and_offset({2, 3}, {4}, {3}, p), (Chunk{V{2, 0}, V{0, 3}}));
}

TEST(LocalShapeAndOffset, HsdpAndTp) {
  // HSDP [Replicate, Shard(0)] on 2x2.
  std::vector<Placement> hsdp{Placement::replicate(), Placement::shard(0)};
  EXPECT_EQ(local_shape_and_offset({8, 4}, {2, 2}, {1, 1}, hsdp), (Chunk{V{4, 0}, V{4, 4}}));
  // Docstring example of compute_local_shape_and_global_offset: (Shard(1), Shard(1)) of 2x5.
  std::vector<Placement> ss{Placement::shard(1), Placement::shard(1)};
  EXPECT_EQ(local_shape_and_offset({2, 5}, {2, 2}, {0, 0}, ss), (Chunk{V{0, 0}, V{2, 2}}));
  EXPECT_EQ(local_shape_and_offset({2, 5}, {2, 2}, {0, 1}, ss), (Chunk{V{0, 2}, V{2, 1}}));
  EXPECT_EQ(local_shape_and_offset({2, 5}, {2, 2}, {1, 0}, ss), (Chunk{V{0, 3}, V{2, 1}}));
  EXPECT_EQ(local_shape_and_offset({2, 5}, {2, 2}, {1, 1}, ss), (Chunk{V{0, 4}, V{2, 1}}));
  // FSDP + TP: (Shard(0), Shard(1)).
  std::vector<Placement> fsdp_tp{Placement::shard(0), Placement::shard(1)};
  EXPECT_EQ(local_shape_and_offset({6, 4}, {2, 2}, {1, 0}, fsdp_tp), (Chunk{V{3, 0}, V{3, 2}}));
}

TEST(Layout, ValidatesAndComputesLocalChunk) {
  auto mesh = DeviceMesh::make(nullptr, {1}, {}, c10::DeviceType::CPU);
  ASSERT_TRUE(mesh.ok());
  auto bad = Layout::on_mesh({4}, *mesh, {Placement::shard(1)});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().message, "Shard(1) is outside a 1-d tensor");
  EXPECT_FALSE(Layout::on_mesh({4}, *mesh, {}).ok());
  auto l = Layout::on_mesh({4, 2}, *mesh, {Placement::shard(0)});
  ASSERT_TRUE(l.ok());
  EXPECT_EQ((*l)->local_chunk(), (Chunk{V{0, 0}, V{4, 2}}));
  EXPECT_FALSE((*l)->fully_replicated());
  EXPECT_FALSE(Layout::explicit_chunk({4}, *mesh, Chunk{V{3}, V{2}}).ok());
}

TEST(DeviceMesh, CoordinatesAndValidation) {
  auto comm = make_local_communicator();
  EXPECT_FALSE(DeviceMesh::make(comm, {2, 2}, {}, c10::DeviceType::CPU).ok());  // world of 1
  auto m = DeviceMesh::make(nullptr, {1, 1}, {0}, c10::DeviceType::CPU);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(*(*m)->my_coordinate(), (V{0, 0}));
  EXPECT_FALSE(DeviceMesh::make(nullptr, {0}, {}, c10::DeviceType::CPU).ok());
}

}  // namespace
}  // namespace dsd

// make_dist_tensor: a local tensor whose shape is not its layout's local chunk is refused
// with kShapeMismatch naming the key, the layout and the chunk; a matching one keeps its
// read-only flag and gets the layout.
#include <ATen/ops/zeros.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "core/dist/mesh.h"
#include "core/statedict/dist_tensor.h"

namespace dsd {
namespace {

using ::testing::HasSubstr;

std::shared_ptr<const Layout> row_sharded(std::vector<int64_t> shape) {
  auto mesh = DeviceMesh::make(nullptr, {1}, {}, c10::DeviceType::CPU);
  return Layout::on_mesh(std::move(shape), *mesh, {Placement::shard(0)}).value();
}

TEST(MakeDistTensor, AcceptsTheLocalChunkAndKeepsReadOnly) {
  auto layout = row_sharded({4, 2});
  auto v = make_dist_tensor(TensorValue{at::zeros({4, 2}), nullptr, true}, layout, "w");
  ASSERT_TRUE(v.ok()) << v.error().message;
  EXPECT_EQ(v->layout, layout);
  EXPECT_TRUE(v->read_only);
  EXPECT_EQ(local_box(*layout).sizes, (std::vector<int64_t>{4, 2}));
}

TEST(MakeDistTensor, RefusesAnotherShapeNamingKeyAndChunk) {
  auto v = make_dist_tensor(TensorValue{at::zeros({3, 2}), nullptr, false}, row_sharded({4, 2}), "w");
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.error().code, Code::kShapeMismatch);
  EXPECT_EQ(v.error().context, "w");
  EXPECT_THAT(v.error().message, HasSubstr("local tensor of 'w' has shape [3, 2]"));
  EXPECT_THAT(v.error().message, HasSubstr("of shape [4, 2]"));
  auto anonymous = make_dist_tensor(TensorValue{at::zeros({1}), nullptr, false}, row_sharded({4, 2}));
  ASSERT_FALSE(anonymous.ok());
  EXPECT_THAT(anonymous.error().message, HasSubstr("local tensor of the tensor has shape [1]"));
  EXPECT_EQ(make_dist_tensor(TensorValue{at::zeros({1}), nullptr, false}, nullptr).error().code, Code::kInvalidArgument);
}

}  // namespace
}  // namespace dsd

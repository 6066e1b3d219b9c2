#include <gtest/gtest.h>

#include <ATen/ops/arange.h>

#include <vector>

#include "core/tensor/dlpack.h"

namespace dsd {
namespace {

// A producer's tensor: owns a buffer, counts deleter calls.
template <class Managed>
struct Producer {
  std::vector<float> data{1, 2, 3, 4, 5, 6};
  std::vector<int64_t> shape{2, 3};
  std::vector<int64_t> strides{3, 1};
  int deletes = 0;
  Managed managed{};

  Producer() {
    DLTensor& t = managed.dl_tensor;
    t.data = data.data();
    t.device = {kDLCPU, 0};
    t.ndim = 2;
    t.dtype = {kDLFloat, 32, 1};
    t.shape = shape.data();
    t.strides = strides.data();
    t.byte_offset = 0;
    managed.manager_ctx = this;
    managed.deleter = [](Managed* self) { static_cast<Producer*>(self->manager_ctx)->deletes++; };
    if constexpr (std::is_same_v<Managed, DLManagedTensorVersioned>) {
      managed.version = {DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION};
      managed.flags = 0;
    }
  }
};

TEST(DLPack, ImportSharesMemoryAndDeletesOnce) {
  Producer<DLManagedTensor> p;
  {
    auto r = import_dlpack(&p.managed);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->tensor.data_ptr(), p.data.data());
    EXPECT_EQ(r->tensor.sizes(), c10::IntArrayRef({2, 3}));
    EXPECT_FALSE(r->read_only);
    at::Tensor alias = r->tensor;  // a second reference
    EXPECT_EQ(p.deletes, 0);
  }
  EXPECT_EQ(p.deletes, 1);
}

TEST(DLPack, VersionedKeepsReadOnlyFlag) {
  Producer<DLManagedTensorVersioned> p;
  p.managed.flags = DLPACK_FLAG_BITMASK_READ_ONLY;
  {
    auto r = import_dlpack_versioned(&p.managed);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_TRUE(r->read_only);
    EXPECT_FLOAT_EQ(r->tensor[1][2].item<float>(), 6.0f);
  }
  EXPECT_EQ(p.deletes, 1);
}

TEST(DLPack, ByteOffsetAndNullStrides) {
  Producer<DLManagedTensor> p;
  p.managed.dl_tensor.byte_offset = sizeof(float) * 3;
  p.managed.dl_tensor.ndim = 1;
  p.managed.dl_tensor.strides = nullptr;  // compact row-major
  p.shape[0] = 3;
  {
    auto r = import_dlpack(&p.managed);
    ASSERT_TRUE(r.ok());
    EXPECT_FLOAT_EQ(r->tensor[0].item<float>(), 4.0f);
  }
  EXPECT_EQ(p.deletes, 1);
}

// Every failure path still calls the deleter exactly once.
TEST(DLPack, ErrorsCallTheDeleterOnce) {
  struct Case {
    const char* name;
    void (*spoil)(DLManagedTensorVersioned&);
    Code code;
  };
  const Case cases[] = {
      {"major version", [](DLManagedTensorVersioned& m) { m.version.major = 2; }, Code::kUnsupported},
      {"vector lanes", [](DLManagedTensorVersioned& m) { m.dl_tensor.dtype.lanes = 2; }, Code::kDtypeMismatch},
      {"unknown dtype", [](DLManagedTensorVersioned& m) { m.dl_tensor.dtype = {kDLFloat, 24, 1}; }, Code::kDtypeMismatch},
      {"opencl device", [](DLManagedTensorVersioned& m) { m.dl_tensor.device = {kDLOpenCL, 0}; }, Code::kDevice},
      {"negative stride", [](DLManagedTensorVersioned& m) { m.dl_tensor.strides[1] = -1; }, Code::kUnsupported},
      {"negative size", [](DLManagedTensorVersioned& m) { m.dl_tensor.shape[0] = -2; }, Code::kShapeMismatch},
      {"null data", [](DLManagedTensorVersioned& m) { m.dl_tensor.data = nullptr; }, Code::kInvalidArgument},
      {"negative ndim", [](DLManagedTensorVersioned& m) { m.dl_tensor.ndim = -1; }, Code::kInvalidArgument},
      {"subbyte padded", [](DLManagedTensorVersioned& m) { m.flags = DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED; }, Code::kUnsupported},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Producer<DLManagedTensorVersioned> p;
    c.spoil(p.managed);
    auto r = import_dlpack_versioned(&p.managed);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, c.code) << r.error().message;
    EXPECT_EQ(p.deletes, 1);
  }
}

TEST(DLPack, CudaWithoutCudaLibtorchIsAClearError) {
  Producer<DLManagedTensor> p;
  p.managed.dl_tensor.device = {kDLCUDA, 0};
  auto r = import_dlpack(&p.managed);
  if (r.ok()) GTEST_SKIP() << "libtorch has CUDA";
  EXPECT_EQ(r.error().code, Code::kDevice);
  EXPECT_NE(r.error().message.find("without CUDA"), std::string::npos);
  EXPECT_EQ(p.deletes, 1);
}

TEST(DLPack, ExportAndReimportIsZeroCopy) {
  at::Tensor t = at::arange(12, at::kFloat).view({3, 4});
  const void* ptr = t.data_ptr();
  auto v1 = export_dlpack_versioned(t, /*read_only=*/true);
  ASSERT_TRUE(v1.ok());
  EXPECT_EQ((*v1)->version.major, 1u);
  EXPECT_EQ((*v1)->flags & DLPACK_FLAG_BITMASK_READ_ONLY, DLPACK_FLAG_BITMASK_READ_ONLY);
  auto back = import_dlpack_versioned(*v1);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->tensor.data_ptr(), ptr);
  EXPECT_TRUE(back->read_only);
  EXPECT_TRUE(back->tensor.equal(t));

  auto v0 = export_dlpack(t.t());  // non-contiguous view keeps its strides
  ASSERT_TRUE(v0.ok());
  EXPECT_EQ((*v0)->dl_tensor.strides[0], 1);
  EXPECT_EQ((*v0)->dl_tensor.strides[1], 4);
  (*v0)->deleter(*v0);
}

TEST(DLPack, ExportKeepsTensorAliveAfterOwnerDrops) {
  DLManagedTensor* m = nullptr;
  {
    at::Tensor t = at::arange(5, at::kLong);
    m = *export_dlpack(t);
  }
  EXPECT_EQ(static_cast<int64_t*>(m->dl_tensor.data)[4], 4);
  m->deleter(m);
}

TEST(Blob, ReleaseRunsOnceOnSuccessAndOnError) {
  std::vector<double> buf(4, 1.5);
  int releases = 0;
  {
    const int64_t shape[] = {2, 2};
    Blob b;
    b.data = buf.data();
    b.dtype = DType::kFloat64;
    b.shape = shape;
    b.release = [&] { releases++; };
    auto t = tensor_from_blob(std::move(b));
    ASSERT_TRUE(t.ok());
    EXPECT_EQ(t->data_ptr(), buf.data());
    EXPECT_EQ(releases, 0);
  }
  EXPECT_EQ(releases, 1);

  const int64_t bad_shape[] = {2, -1};
  Blob b;
  b.data = buf.data();
  b.shape = bad_shape;
  b.release = [&] { releases++; };
  auto t = tensor_from_blob(std::move(b));
  EXPECT_FALSE(t.ok());
  EXPECT_EQ(releases, 2);
}

}  // namespace
}  // namespace dsd

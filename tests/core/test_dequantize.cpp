// Dequantization of FP8 block-scaled weights (interop/dequantize.h) and its option of the
// state view and the exports: each float8 `X.weight` times its `X.weight_scale_inv` per
// 128x128 block (edge blocks cut), against a reference computed block by block with at:: ops
// as PyTorch's QuantizedHuggingFaceStorageReader does; the scales dropped; everything else
// untouched; bad scales and orphan scales refused with the key named.
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "ckpt_test_util.h"
#include "core/interop/convert.h"
#include "core/interop/dequantize.h"
#include "core/interop/state_view.h"

namespace dsd::interop {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using dsd::testing::TempDir;

constexpr const char* kW = "layers.0.mlp.weight";
constexpr const char* kScale = "layers.0.mlp.weight_scale_inv";

at::Tensor fp8_weight(int64_t rows, int64_t cols, uint64_t seed) {
  at::manual_seed(seed);
  return at::randn({rows, cols}).mul_(8).to(at::kFloat8_e4m3fn);
}

// Scales far from 1 and distinct per block, so a factor applied to the wrong block shows.
at::Tensor block_scales(int64_t rows, int64_t cols) {
  return at::rand({(rows + 127) / 128, (cols + 127) / 128}).mul_(3).add_(0.01);
}

// PyTorch's _dequantize_tensor: per block, the float32 weight times the block's scalar
// factor, cast to the target.
at::Tensor reference(const at::Tensor& w, const at::Tensor& scale, at::ScalarType target) {
  const at::Tensor f = w.to(at::kFloat);
  at::Tensor out = at::zeros(w.sizes(), at::TensorOptions().dtype(target));
  for (int64_t i = 0; i < scale.size(0); ++i) {
    for (int64_t j = 0; j < scale.size(1); ++j) {
      const int64_t r0 = i * 128, c0 = j * 128;
      const int64_t nr = std::min<int64_t>(128, w.size(0) - r0), nc = std::min<int64_t>(128, w.size(1) - c0);
      out.narrow(0, r0, nr).narrow(1, c0, nc).copy_(f.narrow(0, r0, nr).narrow(1, c0, nc).mul(scale[i][j]).to(target));
    }
  }
  return out;
}

bool bits_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || !a.sizes().equals(b.sizes())) return false;
  const at::ScalarType as_int = a.element_size() == 2 ? at::kShort : a.element_size() == 4 ? at::kInt : at::kByte;
  return at::equal(a.contiguous().view(as_int), b.contiguous().view(as_int));
}

std::vector<std::string> keys_of(const StateReader& r) {
  std::vector<std::string> keys;
  for (const ItemInfo& it : r.items()) keys.push_back(it.key);
  return keys;
}

// A DeepSeek-V3-like state: a quantized 300x200 weight (partial blocks on both edges) and a
// 256x128 one (whole blocks), a bf16 norm, an int64 buffer, a float32 bias, a value.
struct Fp8State {
  DictPtr sd = Dict::make();
  at::Tensor w = fp8_weight(300, 200, 1), scale = block_scales(300, 200);
  at::Tensor w2 = fp8_weight(256, 128, 2), scale2 = block_scales(256, 128);
  at::Tensor norm = at::randn({200}).to(at::kBFloat16);
  at::Tensor ids = at::arange(7, at::kLong);
  at::Tensor bias = at::randn({300});
  Fp8State() {
    sd->set(kW, Value(w));
    sd->set(kScale, Value(scale));
    sd->set("layers.0.mlp.bias", Value(bias));
    sd->set("layers.0.attn.weight_scale_inv", Value(scale2));  // before its weight: order is free
    sd->set("layers.0.attn.weight", Value(w2));
    sd->set("norm.weight", Value(norm));
    sd->set("ids", Value(ids));
    sd->set("step", Value(int64_t{3}));
  }
};

TEST(Dequantize, PairsScalesByPyTorchsRule) {
  EXPECT_EQ(scaled_weight_key("a.b.weight_scale_inv"), "a.b.weight");
  EXPECT_EQ(scaled_weight_key(".weight_scale_inv"), ".weight");
  // Python's str.replace replaces every occurrence.
  EXPECT_EQ(scaled_weight_key("x.weight_scale_inv.y.weight_scale_inv"), "x.weight.y.weight");
  EXPECT_EQ(scaled_weight_key("weight_scale_inv"), std::nullopt);
  EXPECT_EQ(scaled_weight_key("a.bias_scale_inv"), std::nullopt);
  EXPECT_EQ(scaled_weight_key("a.weight_scale_inv.b"), std::nullopt);
  EXPECT_EQ(scaled_weight_key("a.weight_scales"), std::nullopt);
  EXPECT_EQ(scaled_weight_key("a.weight"), std::nullopt);
}

TEST(Dequantize, ScalesEachBlockDropsTheScalesAndKeepsTheRest) {
  Fp8State s;
  auto base = MUST(StateReader::of(*s.sd));
  StateViewOptions o;
  o.dequantize = true;
  EXPECT_FALSE(is_identity(o));
  auto v = MUST(make_state_view(*base, o));
  EXPECT_THAT(keys_of(*v), ElementsAre(kW, "layers.0.mlp.bias", "layers.0.attn.weight", "norm.weight", "ids", "step"));

  const ItemInfo& w = v->items()[0];
  EXPECT_EQ(w.dtype, DType::kBFloat16);
  EXPECT_THAT(w.shape, ElementsAre(300, 200));
  EXPECT_EQ(w.nbytes, 300u * 200u * 2u);
  ASSERT_EQ(w.chunks.size(), 1u);
  EXPECT_EQ(w.chunks[0].end, w.nbytes);
  const at::Tensor got = MUST(v->read_tensor(0));
  const at::Tensor want = reference(s.w, s.scale, at::kBFloat16);
  EXPECT_TRUE(bits_equal(got, want));
  // The scales matter: the bare cast differs.
  EXPECT_FALSE(bits_equal(got, s.w.to(at::kBFloat16)));
  EXPECT_TRUE(bits_equal(MUST(v->read_tensor(2)), reference(s.w2, s.scale2, at::kBFloat16)));

  EXPECT_TRUE(bits_equal(MUST(v->read_tensor(1)), s.bias));
  EXPECT_EQ(v->items()[1].dtype, DType::kFloat32);
  EXPECT_TRUE(bits_equal(MUST(v->read_tensor(3)), s.norm));
  EXPECT_TRUE(at::equal(MUST(v->read_tensor(4)), s.ids));
  EXPECT_EQ(*MUST(v->read_value(5)).if_int(), 3);
  EXPECT_EQ(v->tensor_bytes(), 300 * 200 * 2 + 300 * 4 + 256 * 128 * 2 + 200 * 2 + 7 * 8);
}

TEST(Dequantize, RoundsOnceToTheCastDtype) {
  Fp8State s;
  auto base = MUST(StateReader::of(*s.sd));
  StateViewOptions o;
  o.dequantize = true;
  o.dtype = DType::kFloat32;
  auto v = MUST(make_state_view(*base, o));
  EXPECT_EQ(v->items()[0].dtype, DType::kFloat32);
  const at::Tensor got = MUST(v->read_tensor(0));
  EXPECT_TRUE(bits_equal(got, reference(s.w, s.scale, at::kFloat)));
  // Not the bfloat16 result widened: the float32 product itself.
  EXPECT_FALSE(bits_equal(got, reference(s.w, s.scale, at::kBFloat16).to(at::kFloat)));
  // The other floating tensors are cast as without dequantize.
  EXPECT_TRUE(bits_equal(MUST(v->read_tensor(3)), s.norm.to(at::kFloat)));
}

TEST(Dequantize, ComesBeforeTheSelectionAndEveryExportHonoursIt) {
  Fp8State s;
  DictPtr root = Dict::make();
  root->set("model", Value(s.sd));
  TempDir tmp;
  ConvertOptions o;
  o.select = "model";
  o.strip_prefix = true;
  o.dequantize = true;
  ASSERT_TRUE(export_safetensors(*root, tmp.sub("hf"), o).ok());
  auto back = MUST(StateReader::open(tmp.sub("hf")));
  EXPECT_THAT(keys_of(*back), ElementsAre(kW, "layers.0.mlp.bias", "layers.0.attn.weight", "norm.weight", "ids", "step"));
  EXPECT_TRUE(bits_equal(MUST(back->read_tensor(0)), reference(s.w, s.scale, at::kBFloat16)));
  EXPECT_TRUE(bits_equal(MUST(back->read_tensor(3)), s.norm));

  ASSERT_TRUE(export_torch_save(*root, tmp.sub("sd.pt"), o).ok());
  auto pt = MUST(StateReader::open(tmp.sub("sd.pt")));
  EXPECT_TRUE(bits_equal(MUST(pt->read_tensor(0)), reference(s.w, s.scale, at::kBFloat16)));
}

TEST(Dequantize, DequantizeBlockwiseMatchesTheReference) {
  const at::Tensor w = fp8_weight(129, 1, 3);
  const at::Tensor scale = block_scales(129, 1);
  EXPECT_TRUE(bits_equal(MUST(dequantize_blockwise(w, scale, DType::kBFloat16, "w")),
                         reference(w, scale, at::kBFloat16)));
  auto bad = dequantize_blockwise(w, scale.t(), DType::kBFloat16, "w");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, Code::kCorrupt);
  EXPECT_THAT(bad.error().message, HasSubstr("w_scale_inv"));
}

Error make_error_of(DictPtr sd) {
  auto base = MUST(StateReader::of(*sd));
  StateViewOptions o;
  o.dequantize = true;
  auto v = make_state_view(*base, o);
  EXPECT_FALSE(v.ok());
  return v.ok() ? Error(Code::kOk, "") : v.error();
}

TEST(Dequantize, RefusesABadScaleNamingIt) {
  {
    Fp8State s;
    s.sd->set(kScale, Value(block_scales(256, 200)));  // [2, 2] for 300 rows
    const Error e = make_error_of(s.sd);
    EXPECT_EQ(e.code, Code::kCorrupt);
    EXPECT_THAT(e.message, HasSubstr(kScale));
    EXPECT_THAT(e.message, HasSubstr("[3, 2]"));
    EXPECT_EQ(e.context, kScale);
  }
  {
    Fp8State s;
    s.sd->set(kScale, Value(s.scale.to(at::kBFloat16)));
    const Error e = make_error_of(s.sd);
    EXPECT_EQ(e.code, Code::kCorrupt);
    EXPECT_THAT(e.message, HasSubstr(kScale));
    EXPECT_THAT(e.message, HasSubstr("bfloat16"));
  }
  {
    Fp8State s;
    s.sd->set(kW, Value(s.w.to(at::kBFloat16)));  // already dequantized, scale kept
    const Error e = make_error_of(s.sd);
    EXPECT_EQ(e.code, Code::kUnsupported);
    EXPECT_THAT(e.message, HasSubstr(kW));
  }
  {
    Fp8State s;
    s.sd->set(kScale, Value(2.0));
    const Error e = make_error_of(s.sd);
    EXPECT_EQ(e.code, Code::kCorrupt);
    EXPECT_THAT(e.message, HasSubstr(kScale));
  }
}

TEST(Dequantize, RefusesAScaleWithoutItsWeight) {
  Fp8State s;
  s.sd->set("layers.1.mlp.weight_scale_inv", Value(block_scales(300, 200)));
  const Error e = make_error_of(s.sd);
  EXPECT_EQ(e.code, Code::kCorrupt);
  EXPECT_THAT(e.message, HasSubstr("'layers.1.mlp.weight_scale_inv'"));
  EXPECT_THAT(e.message, HasSubstr("'layers.1.mlp.weight'"));
  // Without dequantize the same state is read as it is, scales included.
  auto base = MUST(StateReader::of(*s.sd));
  EXPECT_EQ(base->items().size(), 9u);
}

}  // namespace
}  // namespace dsd::interop

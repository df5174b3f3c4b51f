// 4-bit (NF4/FP4) blockwise dequantization for x86 CPUs with AVX-512: the math of
// lorakit.quant.nf4.dequantize_4bit_reference in one pass, bit-identical to it.
//
// Per 16 packed bytes: widen to 16 int32, split high/low nibbles, interleave them into output
// order (high nibble first), look both halves up in the 16-entry code with one permute each,
// scale by the block's fp32 absmax and round to bf16 the way torch does (nearest even).
// Built at first use by lorakit/kernels/dequant_4bit.py with -ffp-contract=off, so that the nested
// absmax (code2[q] * absmax2 + offset) is rounded twice, as the reference rounds it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

namespace {

inline __m256i to_bf16(__m512 v) {
  // c10::BFloat16's round-to-nearest-even for finite values: add 0x7FFF + the kept lsb, keep 16 bits.
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}

inline float block_absmax(const float* absmax, const uint8_t* qabsmax, const float* code2, const float* absmax2,
                          float offset, int64_t blocksize2, int64_t block) {
  if (qabsmax == nullptr) return absmax[block];
  float scaled = code2[qabsmax[block]] * absmax2[block / blocksize2];
  return scaled + offset;
}

}  // namespace

// packed: uint8 [n / 2]; code: fp32 [16]; absmax: fp32 [n / blocksize] (plain) or uint8 codes (nested, with
// code2 fp32 [256], absmax2 fp32, offset, blocksize2). n must be a multiple of blocksize, blocksize of 32.
torch::Tensor dequantize_4bit(torch::Tensor packed, torch::Tensor code, torch::Tensor absmax,
                              c10::optional<torch::Tensor> code2, c10::optional<torch::Tensor> absmax2,
                              double offset, int64_t blocksize, int64_t blocksize2, bool to_bf16_out) {
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == torch::kUInt8, "packed: contiguous uint8");
  TORCH_CHECK(code.numel() == 16 && code.scalar_type() == torch::kFloat32, "code: 16 fp32 values");
  TORCH_CHECK(blocksize % 32 == 0 && (packed.numel() * 2) % blocksize == 0, "whole blocks of a multiple of 32");
  const bool nested = code2.has_value();
  const int64_t n = packed.numel() * 2;
  const int64_t nblocks = n / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks, "one absmax per block");
  auto out = torch::empty({n}, torch::dtype(to_bf16_out ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const float* plain = nested ? nullptr : absmax.data_ptr<float>();
  const uint8_t* qabsmax = nested ? absmax.data_ptr<uint8_t>() : nullptr;
  const float* c2 = nested ? code2->data_ptr<float>() : nullptr;
  const float* a2 = nested ? absmax2->data_ptr<float>() : nullptr;
  const float off = static_cast<float>(offset);
  const __m512 table = _mm512_loadu_ps(code.data_ptr<float>());
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  void* dst = out.data_ptr();
  at::parallel_for(0, nblocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const __m512 scale = _mm512_set1_ps(block_absmax(plain, qabsmax, c2, a2, off, blocksize2, b));
      const uint8_t* s = src + b * (blocksize / 2);
      for (int64_t i = 0; i < blocksize / 2; i += 16) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
        __m512i high = _mm512_srli_epi32(bytes, 4);
        __m512i low = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
        __m512 v1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(high, first, low), table), scale);
        __m512 v2 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(high, second, low), table), scale);
        const int64_t o = b * blocksize + 2 * i;
        if (to_bf16_out) {
          auto* d = static_cast<uint16_t*>(dst) + o;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), to_bf16(v1));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16), to_bf16(v2));
        } else {
          auto* d = static_cast<float*>(dst) + o;
          _mm512_storeu_ps(d, v1);
          _mm512_storeu_ps(d + 16, v2);
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_4bit", &dequantize_4bit, "4-bit blockwise dequantization (AVX-512)");
}

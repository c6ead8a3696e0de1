// The iovec copies against a flat reference: every function is run over the same bytes cut into
// pieces in many ways (pieces of one byte, empty pieces, offsets landing on and inside piece
// boundaries), and must give what a memcpy on the flat buffer gives.
#include "vhostkit/virtq/iov.h"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace vhostkit::virtq {
namespace {

// A flat buffer and an iovec list cutting it into pieces of the given lengths, in order.
struct Pieces {
  std::vector<std::uint8_t> bytes;
  std::vector<iovec> iov;

  explicit Pieces(std::vector<std::size_t> lens, std::uint8_t seed = 1) {
    bytes.resize(std::accumulate(lens.begin(), lens.end(), std::size_t{0}));
    for (std::size_t i = 0; i < bytes.size(); ++i) {
      bytes[i] = static_cast<std::uint8_t>(seed + i * 7);
    }
    std::size_t at = 0;
    for (std::size_t len : lens) {
      iov.push_back(iovec{bytes.data() + at, len});
      at += len;
    }
  }
  std::span<const iovec> span() const { return iov; }
};

std::vector<std::uint8_t> pattern(std::size_t n, std::uint8_t seed) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>(seed ^ (i * 13));
  return v;
}

TEST(IovTest, SizeSumsEveryPiece) {
  EXPECT_EQ(iov_size({}), 0u);
  EXPECT_EQ(iov_size(Pieces({3, 0, 5, 1}).span()), 9u);
}

TEST(IovTest, ReadAHeaderSplitAcrossPieces) {
  // A 12-byte virtio-net header over three descriptors, then the frame.
  Pieces src({5, 4, 3, 20});
  std::array<std::uint8_t, 12> hdr{};
  ASSERT_EQ(iov_read(src.span(), 0, hdr.data(), hdr.size()), 12u);
  EXPECT_TRUE(std::equal(hdr.begin(), hdr.end(), src.bytes.begin()));
  std::array<std::uint8_t, 6> mac{};
  ASSERT_EQ(iov_read(src.span(), 12, mac.data(), mac.size()), 6u);
  EXPECT_TRUE(std::equal(mac.begin(), mac.end(), src.bytes.begin() + 12));
}

TEST(IovTest, ReadStopsAtTheEnd) {
  Pieces src({4, 4});
  std::array<std::uint8_t, 8> out{};
  EXPECT_EQ(iov_read(src.span(), 5, out.data(), 8), 3u);
  EXPECT_TRUE(std::equal(out.begin(), out.begin() + 3, src.bytes.begin() + 5));
  EXPECT_EQ(iov_read(src.span(), 8, out.data(), 1), 0u);
  EXPECT_EQ(iov_read(src.span(), 9, out.data(), 1), 0u);  // an offset past the end
  EXPECT_EQ(iov_read({}, 0, out.data(), 1), 0u);
}

TEST(IovTest, WriteLandsPiecewiseAndTouchesNothingElse) {
  Pieces dst({2, 0, 3, 7});
  const auto before = dst.bytes;
  const auto src = pattern(6, 0x5a);
  ASSERT_EQ(iov_write(dst.span(), 1, src.data(), src.size()), 6u);
  auto want = before;
  std::copy(src.begin(), src.end(), want.begin() + 1);
  EXPECT_EQ(dst.bytes, want);
}

TEST(IovTest, WriteStopsAtTheEnd) {
  Pieces dst({3, 3});
  const auto src = pattern(10, 0x11);
  EXPECT_EQ(iov_write(dst.span(), 4, src.data(), src.size()), 2u);
  EXPECT_EQ(dst.bytes[4], src[0]);
  EXPECT_EQ(dst.bytes[5], src[1]);
  EXPECT_EQ(iov_write(dst.span(), 7, src.data(), 1), 0u);
}

TEST(IovTest, CopyBetweenListsIsLimitedByEachSide) {
  Pieces src({1, 5, 2, 9});  // 17 bytes
  Pieces dst({4, 4, 4}, 0x80);
  auto want = dst.bytes;
  // Bounded by dst: 12 - 3 = 9 bytes from src offset 6.
  ASSERT_EQ(iov_copy(dst.span(), 3, src.span(), 6, 100), 9u);
  std::copy(src.bytes.begin() + 6, src.bytes.begin() + 15, want.begin() + 3);
  EXPECT_EQ(dst.bytes, want);
  // Bounded by src: 17 - 15 = 2.
  EXPECT_EQ(iov_copy(dst.span(), 0, src.span(), 15, 100), 2u);
  // Bounded by n.
  EXPECT_EQ(iov_copy(dst.span(), 0, src.span(), 0, 5), 5u);
  // An offset past either end copies nothing.
  EXPECT_EQ(iov_copy(dst.span(), 13, src.span(), 0, 5), 0u);
  EXPECT_EQ(iov_copy(dst.span(), 0, src.span(), 18, 5), 0u);
}

TEST(IovTest, TailSkipsWithoutCopying) {
  Pieces src({4, 0, 6, 2});
  std::array<iovec, 4> out{};
  // Inside the third piece (the empty one is stepped over).
  ASSERT_EQ(iov_tail(src.span(), 5, out), 2u);
  EXPECT_EQ(out[0].iov_base, src.bytes.data() + 5);
  EXPECT_EQ(out[0].iov_len, 5u);
  EXPECT_EQ(out[1].iov_base, src.bytes.data() + 10);
  EXPECT_EQ(out[1].iov_len, 2u);
  // On a boundary: the next piece whole.
  ASSERT_EQ(iov_tail(src.span(), 4, out), 2u);
  EXPECT_EQ(out[0].iov_base, src.bytes.data() + 4);
  EXPECT_EQ(out[0].iov_len, 6u);
  // Everything skipped, and an output that is too small.
  EXPECT_EQ(iov_tail(src.span(), 12, out), 0u);
  EXPECT_EQ(iov_tail(src.span(), 0, std::span<iovec>(out).first(2)), 2u);
}

TEST(IovCursorTest, AdvanceAndRemaining) {
  Pieces src({3, 0, 4, 5});
  IovCursor c(src.span());
  EXPECT_EQ(c.remaining(), 12u);
  EXPECT_EQ(c.advance(3), 3u);  // onto a piece boundary
  EXPECT_EQ(c.remaining(), 9u);
  EXPECT_EQ(c.advance(6), 6u);
  std::uint8_t b = 0;
  ASSERT_EQ(c.read(&b, 1), 1u);
  EXPECT_EQ(b, src.bytes[9]);
  EXPECT_EQ(c.advance(100), 2u);
  EXPECT_TRUE(c.at_end());
  EXPECT_EQ(c.read(&b, 1), 0u);
  EXPECT_EQ(IovCursor().remaining(), 0u);
}

TEST(IovCursorTest, ReadKeepsItsPlace) {
  Pieces src({2, 3, 4});
  IovCursor c(src.span());
  std::array<std::uint8_t, 9> out{};
  std::size_t got = 0;
  for (std::size_t step : {1u, 3u, 2u, 10u}) got += c.read(out.data() + got, step);
  EXPECT_EQ(got, 9u);
  EXPECT_TRUE(std::equal(out.begin(), out.end(), src.bytes.begin()));
}

TEST(IovCursorTest, WriteFillsInSteps) {
  Pieces dst({1, 4, 4});
  IovCursor c(dst.span());
  const auto a = pattern(3, 0x21), b = pattern(10, 0x42);
  EXPECT_EQ(c.write(a.data(), a.size()), 3u);
  EXPECT_EQ(c.write(b.data(), b.size()), 6u);  // only 6 left
  EXPECT_TRUE(std::equal(a.begin(), a.end(), dst.bytes.begin()));
  EXPECT_TRUE(std::equal(b.begin(), b.begin() + 6, dst.bytes.begin() + 3));
  EXPECT_TRUE(c.at_end());
}

// A frame spread over several rx chains (mergeable rx buffers): the first chain's data starts
// after a header, the others at 0, and the source keeps its place from one to the next.
TEST(IovCursorTest, CopyToSpreadsOverSeveralChains) {
  Pieces frame({14, 50, 36});  // 100 bytes
  Pieces c1({8, 30}, 0x90), c2({25}, 0x91), c3({7, 40}, 0x92);
  IovCursor src(frame.span());
  EXPECT_EQ(src.copy_to(c1.span(), 12, 100), 26u);
  EXPECT_EQ(src.copy_to(c2.span(), 0, 100), 25u);
  EXPECT_EQ(src.copy_to(c3.span(), 0, 100), 47u);
  EXPECT_EQ(src.remaining(), 2u);
  EXPECT_EQ(src.copy_to(c3.span(), 48, 5), 0u);  // a destination offset past the end
  std::vector<std::uint8_t> got(c1.bytes.begin() + 12, c1.bytes.end());
  got.insert(got.end(), c2.bytes.begin(), c2.bytes.end());
  got.insert(got.end(), c3.bytes.begin(), c3.bytes.end());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), frame.bytes.begin()));
}

TEST(IovCursorTest, CursorToCursorMovesBoth) {
  Pieces src({5, 5, 5});
  Pieces dst({3, 3, 3, 3}, 0x70);
  IovCursor s(src.span()), d(dst.span());
  s.advance(2);
  EXPECT_EQ(s.copy_to(d, 4), 4u);
  EXPECT_EQ(s.remaining(), 9u);
  EXPECT_EQ(d.remaining(), 8u);
  EXPECT_EQ(s.copy_to(d, 100), 8u);  // dst is full first
  EXPECT_EQ(s.remaining(), 1u);
  EXPECT_TRUE(d.at_end());
  EXPECT_TRUE(std::equal(dst.bytes.begin(), dst.bytes.end(), src.bytes.begin() + 2));
}

TEST(IovCursorTest, RestIsThePiecesFromThePosition) {
  Pieces src({4, 6});
  IovCursor c(src.span());
  std::array<iovec, 2> out{};
  c.advance(5);
  ASSERT_EQ(c.rest(out), 1u);
  EXPECT_EQ(out[0].iov_base, src.bytes.data() + 5);
  EXPECT_EQ(out[0].iov_len, 5u);
  c.advance(5);
  EXPECT_EQ(c.rest(out), 0u);
}

// Random cuts of the same bytes on both sides, random offsets and lengths, against memcpy on
// the flat buffers. The seed is fixed: a failure names a case that reproduces.
TEST(IovTest, RandomCutsMatchAFlatCopy) {
  std::mt19937 rng(14);
  auto cuts = [&](std::size_t total) {
    std::vector<std::size_t> lens;
    std::size_t left = total;
    while (left != 0) {
      const std::size_t k =
          std::uniform_int_distribution<std::size_t>(0, std::min<std::size_t>(left, 9))(rng);
      lens.push_back(k);
      left -= k;
    }
    return lens;
  };
  for (int round = 0; round < 2000; ++round) {
    const std::size_t slen = std::uniform_int_distribution<std::size_t>(0, 40)(rng);
    const std::size_t dlen = std::uniform_int_distribution<std::size_t>(0, 40)(rng);
    Pieces src(cuts(slen), 3), dst(cuts(dlen), 0xc0);
    const std::size_t soff = std::uniform_int_distribution<std::size_t>(0, slen + 2)(rng);
    const std::size_t doff = std::uniform_int_distribution<std::size_t>(0, dlen + 2)(rng);
    const std::size_t n = std::uniform_int_distribution<std::size_t>(0, 45)(rng);
    auto want = dst.bytes;
    std::size_t k = 0;
    if (soff <= slen && doff <= dlen) {
      k = std::min({n, slen - soff, dlen - doff});
      std::copy_n(src.bytes.begin() + soff, k, want.begin() + doff);
    }
    ASSERT_EQ(iov_copy(dst.span(), doff, src.span(), soff, n), k) << "round " << round;
    ASSERT_EQ(dst.bytes, want) << "round " << round;

    std::vector<std::uint8_t> flat(n, 0xee), flat_want(n, 0xee);
    const std::size_t r = soff <= slen ? std::min(n, slen - soff) : 0;
    std::copy_n(src.bytes.begin() + std::min(soff, slen), r, flat_want.begin());
    ASSERT_EQ(iov_read(src.span(), soff, flat.data(), n), r) << "round " << round;
    ASSERT_EQ(flat, flat_want) << "round " << round;

    IovCursor c(src.span());
    ASSERT_EQ(c.advance(soff), std::min(soff, slen));
    ASSERT_EQ(c.remaining(), slen - std::min(soff, slen));
  }
}

}  // namespace
}  // namespace vhostkit::virtq

// virtio-blk requests whose buffers lie across two guest memory regions: region A and region B
// are adjacent in guest-physical space but are two memfds, mapped separately by the device (as
// QEMU hands over two RAM blocks), so a buffer that crosses the boundary is two host pieces.
// GuestMemory::gpa_to_iovec splits such a buffer at the boundary and the chain walker hands
// both pieces on; blk_io must then read the header, move the data and place the status byte
// across those pieces. A buffer that runs past the last region is refused (used len 0, nothing
// written). Every test runs on both I/O paths and checks every byte it moved, in the image and
// in guest memory, plus guard bytes on each side of the data.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "testing/blk_rig.h"

namespace vhostkit::blk::testing {
namespace {

constexpr std::size_t kImage = 4 << 20;
constexpr std::uint8_t kGuard = 0x5a;
constexpr std::uint8_t kUnwritten = 0xee;

// Guest memory in two memfds: A = [0, kBoundary) holds the ring and is GuestRings' own memory;
// B = [kBoundary, kBoundary + kSizeB) is a second memfd mapped at an unrelated address.
class TwoRegionGuest : public vhost::testing::GuestRings {
 public:
  static constexpr std::uint64_t kBoundary = 0x400000;
  static constexpr std::uint64_t kSizeB = 0x400000;
  static constexpr std::uint64_t kEnd = kBoundary + kSizeB;  // nothing mapped from here

  TwoRegionGuest() : GuestRings("blk-region-a", kBoundary, 1, 64, kFeatures) {
    memfd_b_ = UniqueFd(::memfd_create("blk-region-b", MFD_CLOEXEC));
    EXPECT_TRUE(memfd_b_.valid());
    EXPECT_EQ(::ftruncate(memfd_b_.get(), static_cast<off_t>(kSizeB)), 0);
    void* p = ::mmap(nullptr, kSizeB, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_b_.get(), 0);
    EXPECT_NE(p, MAP_FAILED);
    base_b_ = static_cast<std::uint8_t*>(p);
  }
  ~TwoRegionGuest() { ::munmap(base_b_, kSizeB); }

  // The test's view of one guest byte.
  std::uint8_t* at(std::uint64_t gpa) {
    return gpa < kBoundary ? host(gpa) : base_b_ + (gpa - kBoundary);
  }
  void put(std::uint64_t gpa, const Bytes& b) {
    for (std::size_t i = 0; i < b.size(); ++i) *at(gpa + i) = b[i];
  }
  void fill(std::uint64_t gpa, std::size_t len, std::uint8_t v) {
    for (std::size_t i = 0; i < len; ++i) *at(gpa + i) = v;
  }
  Bytes get(std::uint64_t gpa, std::size_t len) {
    Bytes b(len);
    for (std::size_t i = 0; i < len; ++i) b[i] = *at(gpa + i);
    return b;
  }

  // The vhost-user start sequence with a two-region memory table.
  void bring_up_two_regions(vhost::Device& dev) {
    ASSERT_TRUE(dev.set_owner().has_value());
    ASSERT_TRUE(dev.set_features(features()).has_value());
    std::vector<memory::RegionFd> t;
    t.push_back(region());
    t.push_back(memory::RegionFd{
        memory::RegionSpec{kBoundary, kSizeB, reinterpret_cast<std::uint64_t>(base_b_), 0},
        dup_fd(memfd_b_.get())});
    auto m = dev.set_mem_table(std::move(t));
    ASSERT_TRUE(m.has_value()) << m.error().message();
    configure(dev, 0);
  }

  // Writes a request header at `gpa`.
  void header(std::uint64_t gpa, std::uint32_t type, std::uint64_t sector) {
    const virtio::VirtioBlkOutHdr h{type, 0, sector};
    Bytes b(sizeof h);
    std::memcpy(b.data(), &h, sizeof h);
    put(gpa, b);
  }

  // Adds a chain, kicks, and waits for its used element: its len, or nullopt on timeout.
  std::optional<std::uint32_t> run(std::vector<Buffer> out, std::vector<Buffer> in) {
    auto h = driver(0).add(out, in, ++token_);
    EXPECT_TRUE(h.has_value());
    if (!h) return std::nullopt;
    kick(0);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      if (auto u = driver(0).get_used()) {
        EXPECT_EQ(u->token, token_);
        return u->len;
      }
      wait_call(0, 10);
    }
    ADD_FAILURE() << "no used element within 20 s";
    return std::nullopt;
  }

 private:
  UniqueFd memfd_b_;
  std::uint8_t* base_b_ = nullptr;
  std::uint64_t token_ = 0;
};

using G = TwoRegionGuest;
// Scratch places for headers and status bytes, away from every data buffer below.
constexpr std::uint64_t kHdrA = 0x100000, kStatusA = 0x100100;
constexpr std::uint64_t kHdrB = G::kBoundary + 0x300000, kStatusB = G::kBoundary + 0x300100;

class BlkRegion : public ::testing::TestWithParam<IoPath> {
 protected:
  BlkRegion()
      : img_(kImage),
        blk_(open_device(img_.path(), false, 1, true, GetParam())),
        dev_(*blk_, dev_opts()) {
    g_.bring_up_two_regions(dev_);
  }

  // A data area of `len` bytes at `gpa` with `kGuard` bytes around it.
  void guard(std::uint64_t gpa, std::size_t len) {
    g_.fill(gpa - 64, 64, kGuard);
    g_.fill(gpa + len, 64, kGuard);
  }
  void expect_guards(std::uint64_t gpa, std::size_t len) {
    EXPECT_EQ(g_.get(gpa - 64, 64), Bytes(64, kGuard)) << "bytes before the data were written";
    EXPECT_EQ(g_.get(gpa + len, 64), Bytes(64, kGuard)) << "bytes after the data were written";
  }

  // OUT of `data` at `sector`, the data buffers given; header and status in the given places.
  void write(std::uint64_t sector, const Bytes& data, std::vector<Buffer> pieces,
             std::uint64_t hdr = kHdrA, std::uint64_t status = kStatusB) {
    g_.header(hdr, virtio::blk_type::out, sector);
    std::size_t off = 0;
    for (const Buffer& b : pieces) {
      g_.put(b.gpa, Bytes(data.begin() + off, data.begin() + off + b.len));
      off += b.len;
    }
    ASSERT_EQ(off, data.size());
    *g_.at(status) = kUnwritten;
    std::vector<Buffer> out{{hdr, 16}};
    out.insert(out.end(), pieces.begin(), pieces.end());
    const auto len = g_.run(out, {{status, 1}});
    ASSERT_TRUE(len.has_value());
    EXPECT_EQ(*len, 1u);
    EXPECT_EQ(*g_.at(status), virtio::kBlkSOk);
    EXPECT_EQ(img_.read(sector * 512, data.size()), data);
  }

  // IN of the bytes the buffers cover from `sector`; returns them as the guest sees them.
  Bytes read(std::uint64_t sector, std::vector<Buffer> pieces, std::uint64_t hdr = kHdrA,
             std::uint64_t status = kStatusB) {
    g_.header(hdr, virtio::blk_type::in, sector);
    std::size_t total = 0;
    for (const Buffer& b : pieces) {
      g_.fill(b.gpa, b.len, 0xa5);
      total += b.len;
    }
    *g_.at(status) = kUnwritten;
    std::vector<Buffer> in = pieces;
    in.push_back({status, 1});
    const auto len = g_.run({{hdr, 16}}, in);
    EXPECT_TRUE(len.has_value());
    EXPECT_EQ(len.value_or(0), total + 1);
    EXPECT_EQ(*g_.at(status), virtio::kBlkSOk);
    Bytes got;
    for (const Buffer& b : pieces) {
      const Bytes part = g_.get(b.gpa, b.len);
      got.insert(got.end(), part.begin(), part.end());
    }
    return got;
  }

  TempImage img_;
  std::unique_ptr<BlkDevice> blk_;
  vhost::Device dev_;
  TwoRegionGuest g_;
};

INSTANTIATE_TEST_SUITE_P(Path, BlkRegion, ::testing::Values(IoPath::uring, IoPath::inline_call),
                         [](const auto& i) {
                           return i.param == IoPath::uring ? "uring" : "inline";
                         });

// One 16 KiB data descriptor, half in A and half in B, page-aligned: split into two pieces that
// are still aligned, so O_DIRECT takes them as they are.
TEST_P(BlkRegion, OneDataDescriptorAcrossTheBoundary) {
  const std::uint64_t data = G::kBoundary - 8192;
  const Bytes pattern_w = pattern(16384, 21);
  guard(data, 16384);
  write(64, pattern_w, {{data, 16384}});
  expect_guards(data, 16384);
  EXPECT_EQ(read(64, {{data, 16384}}), pattern_w);
  expect_guards(data, 16384);
  const auto st = blk_->stats(0);
  EXPECT_EQ(st.reads, 1u);
  EXPECT_EQ(st.writes, 1u);
  EXPECT_EQ(st.bad_requests + st.io_errors + st.no_status, 0u);
  if (blk_->direct_io()) {
    EXPECT_EQ(st.buffered, 0u);
  }
  // The sectors around the write kept the image's own contents.
  TempImage fresh(kImage);
  EXPECT_EQ(img_.read(63 * 512, 512), fresh.read(63 * 512, 512));
  EXPECT_EQ(img_.read(96 * 512, 512), fresh.read(96 * 512, 512));
}

// The same, but crossing at a byte offset no sector size divides: the pieces are 700 and 3396
// bytes, which O_DIRECT refuses, so the request goes the buffered way and is still exact.
TEST_P(BlkRegion, UnalignedDescriptorAcrossTheBoundary) {
  const std::uint64_t data = G::kBoundary - 700;
  const Bytes w = pattern(4096, 22);
  guard(data, 4096);
  write(10, w, {{data, 4096}});
  expect_guards(data, 4096);
  EXPECT_EQ(read(10, {{data, 4096}}), w);
  expect_guards(data, 4096);
  if (blk_->direct_io()) {
    EXPECT_EQ(blk_->stats(0).buffered, 2u);
  }
}

// Every descriptor of the chain in a different region from the one before it: header in B,
// data in A, B, A, status in A (write) and the mirror image for the read.
TEST_P(BlkRegion, ChainWithDescriptorsInBothRegions) {
  const std::vector<Buffer> pieces{
      {0x200000, 2048}, {G::kBoundary + 0x10000, 2048}, {0x280000, 1024}};
  const Bytes w = pattern(5120, 23);
  for (const Buffer& b : pieces) guard(b.gpa, b.len);
  write(200, w, pieces, kHdrB, kStatusA);
  EXPECT_EQ(read(200, pieces, kHdrB, kStatusA), w);
  for (const Buffer& b : pieces) expect_guards(b.gpa, b.len);
  const std::vector<Buffer> other{{G::kBoundary + 0x20000, 1536}, {0x300000, 3584}};
  for (const Buffer& b : other) guard(b.gpa, b.len);
  EXPECT_EQ(read(200, other, kHdrA, kStatusB), w);
  for (const Buffer& b : other) expect_guards(b.gpa, b.len);
}

// The 16-byte header itself split 8 + 8 by the boundary, in one descriptor with the data after
// it (type and sector are read across the two pieces; the data starts exactly at B's first byte).
TEST_P(BlkRegion, HeaderSplitByTheBoundary) {
  const std::uint64_t hdr = G::kBoundary - 8;
  const Bytes w = pattern(4096, 24);
  g_.header(hdr, virtio::blk_type::out, 300);
  g_.put(hdr + 16, w);
  guard(hdr, 16 + 4096);
  *g_.at(kStatusA) = kUnwritten;
  const auto len = g_.run({{hdr, 16 + 4096}}, {{kStatusA, 1}});
  ASSERT_TRUE(len.has_value());
  EXPECT_EQ(*len, 1u);
  EXPECT_EQ(*g_.at(kStatusA), virtio::kBlkSOk);
  EXPECT_EQ(img_.read(300 * 512, 4096), w);
  expect_guards(hdr, 16 + 4096);
  EXPECT_EQ(blk_->stats(0).writes, 1u);
}

// A read whose one writable descriptor holds the data and the status byte, crossing so that the
// status byte is alone in region B: a 1-byte piece at the end of the chain.
TEST_P(BlkRegion, StatusByteAloneInTheSecondRegion) {
  const Bytes w = pattern(4096, 25);
  write(400, w, {{0x200000, 4096}});
  const std::uint64_t buf = G::kBoundary - 4096;
  g_.header(kHdrA, virtio::blk_type::in, 400);
  g_.fill(buf, 4096, 0xa5);
  *g_.at(G::kBoundary) = kUnwritten;
  guard(buf, 4097);
  const auto len = g_.run({{kHdrA, 16}}, {{buf, 4097}});
  ASSERT_TRUE(len.has_value());
  EXPECT_EQ(*len, 4097u);
  EXPECT_EQ(g_.get(buf, 4096), w);
  EXPECT_EQ(*g_.at(G::kBoundary), virtio::kBlkSOk);
  expect_guards(buf, 4097);
  EXPECT_EQ(blk_->stats(0).reads, 1u);
}

// A data descriptor that starts in B and runs past B's end into unmapped guest space: the chain
// is refused as a whole (used len 0), no status is written, neither the image nor guest memory
// changes, and the next request is served.
TEST_P(BlkRegion, DescriptorRunningPastTheLastRegionIsRefused) {
  const Bytes before = img_.read(0, kImage);
  const std::uint64_t data = G::kEnd - 2048;
  g_.header(kHdrA, virtio::blk_type::out, 0);
  g_.fill(data, 2048, 0x77);
  *g_.at(kStatusA) = kUnwritten;
  auto len = g_.run({{kHdrA, 16}, {data, 4096}}, {{kStatusA, 1}});
  ASSERT_TRUE(len.has_value());
  EXPECT_EQ(*len, 0u);
  EXPECT_EQ(*g_.at(kStatusA), kUnwritten);
  // The same buffer as a read target: nothing lands in the mapped half either.
  g_.header(kHdrA, virtio::blk_type::in, 0);
  len = g_.run({{kHdrA, 16}}, {{data, 4096}, {kStatusA, 1}});
  ASSERT_TRUE(len.has_value());
  EXPECT_EQ(*len, 0u);
  EXPECT_EQ(*g_.at(kStatusA), kUnwritten);
  EXPECT_EQ(g_.get(data, 2048), Bytes(2048, 0x77));
  EXPECT_EQ(img_.read(0, kImage), before);
  EXPECT_EQ(
      dev_.queue(0).vq().errors()[static_cast<std::size_t>(virtq::ChainError::desc_not_mapped)],
      2u);
  EXPECT_EQ(blk_->stats(0).reads + blk_->stats(0).writes, 0u);
  // Still serving: a request across the boundary right after.
  const Bytes w = pattern(1024, 26);
  write(8, w, {{G::kBoundary - 512, 1024}});
  EXPECT_FALSE(dev_.broken());
}

}  // namespace
}  // namespace vhostkit::blk::testing

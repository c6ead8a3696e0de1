// Hostile requests: every malformed chain gets IOERR/UNSUPP (or used len 0 when it has no status
// byte), the image is untouched, and the device keeps serving the next request.
#include <gtest/gtest.h>

#include <cstring>

#include "testing/blk_rig.h"

namespace vhostkit::blk::testing {
namespace {

constexpr std::size_t kImage = 1 << 20;  // 2048 sectors
constexpr std::uint64_t kSectors = kImage / 512;

class BlkHostile : public ::testing::Test {
 protected:
  BlkHostile() : img(kImage), blk(open_device(img.path())), dev(*blk, dev_opts()), guest(1) {
    guest.bring_up(dev);
    before = img.read(0, kImage);
  }

  // The device still works after the bad request, and the image is what it was.
  void expect_alive() {
    auto rd = guest.request(0, virtio::blk_type::in, 0, {}, 512);
    ASSERT_TRUE(rd);
    auto [s, len] = guest.run(0, *rd);
    EXPECT_EQ(s, virtio::kBlkSOk);
    EXPECT_EQ(len, 513u);
    EXPECT_EQ(guest.data(0, *rd, 512), Bytes(before.begin(), before.begin() + 512));
    EXPECT_EQ(img.read(0, kImage), before);
  }

  // A raw chain in a fresh slot; buffers are offsets into the slot.
  struct Piece {
    std::size_t off;
    std::uint32_t len;
  };
  std::uint16_t raw(std::uint32_t type, std::uint64_t sector, std::vector<Piece> out,
                    std::vector<Piece> in) {
    auto slot = guest.take_slot(0);
    EXPECT_TRUE(slot);
    guest.write_hdr(0, *slot, type, sector);
    std::vector<Buffer> o, i;
    const std::uint64_t base = guest.slot_gpa(0, *slot);
    for (auto& p : out) o.push_back({base + p.off, p.len});
    for (auto& p : in) i.push_back({base + p.off, p.len});
    EXPECT_TRUE(guest.add_raw(0, *slot, o, i));
    return *slot;
  }

  static constexpr std::size_t kHdr = 0;
  static constexpr std::size_t kSt = BlkGuest::kStatusOff;
  static constexpr std::size_t kData = BlkGuest::kDataOff;

  TempImage img;
  std::unique_ptr<BlkDevice> blk;
  vhost::Device dev;
  BlkGuest guest;
  Bytes before;
};

TEST_F(BlkHostile, ReadSectorOutOfRange) {
  auto s = guest.request(0, virtio::blk_type::in, kSectors, {}, 512);
  auto [st, len] = guest.run(0, *s);
  EXPECT_EQ(st, virtio::kBlkSIoErr);
  EXPECT_EQ(len, 1u);
  EXPECT_EQ(guest.data(0, *s, 512), Bytes(512, 0xa5));  // nothing written into the buffer
  EXPECT_EQ(blk->stats(0).bad_requests, 1u);
  expect_alive();
}

TEST_F(BlkHostile, WriteSectorOutOfRange) {
  auto s = guest.request(0, virtio::blk_type::out, kSectors - 1, pattern(1024, 1));
  EXPECT_EQ(guest.run(0, *s).first, virtio::kBlkSIoErr);
  expect_alive();
}

TEST_F(BlkHostile, SectorPlusLengthOverflows) {
  // sector * 512 and sector + len wrap around 64 bits: must not pass as a small offset.
  for (std::uint64_t sector : {~std::uint64_t{0}, ~std::uint64_t{0} - 1, std::uint64_t{1} << 55,
                               (~std::uint64_t{0} >> 9) + 1}) {
    auto s = guest.request(0, virtio::blk_type::out, sector, pattern(4096, 2));
    EXPECT_EQ(guest.run(0, *s).first, virtio::kBlkSIoErr) << sector;
  }
  expect_alive();
}

TEST_F(BlkHostile, ShortHeader) {
  // Only 8 readable bytes: no complete header.
  auto s = raw(virtio::blk_type::in, 0, {{kHdr, 8}}, {{kData, 512}, {kSt, 1}});
  auto [st, len] = guest.run(0, s);
  EXPECT_EQ(st, virtio::kBlkSIoErr);
  EXPECT_EQ(len, 1u);
  expect_alive();
}

TEST_F(BlkHostile, NoReadableHeaderAtAll) {
  auto s = raw(virtio::blk_type::in, 0, {}, {{kData, 512}, {kSt, 1}});
  EXPECT_EQ(guest.run(0, s).first, virtio::kBlkSIoErr);
  expect_alive();
}

TEST_F(BlkHostile, HeaderSplitOverDescriptorsIsFine) {
  // Not hostile, but the edge of the header rule: 16 bytes in 3 + 5 + 8.
  auto s = raw(virtio::blk_type::in, 1, {{kHdr, 3}, {kHdr + 3, 5}, {kHdr + 8, 8}},
               {{kData, 512}, {kSt, 1}});
  auto [st, len] = guest.run(0, s);
  EXPECT_EQ(st, virtio::kBlkSOk);
  EXPECT_EQ(len, 513u);
  EXPECT_EQ(guest.data(0, s, 512), Bytes(before.begin() + 512, before.begin() + 1024));
}

TEST_F(BlkHostile, NoStatusByte) {
  // A write with nothing writable: no status byte to answer in.
  auto s = raw(virtio::blk_type::out, 0, {{kHdr, 16}, {kData, 512}}, {});
  auto got = guest.complete(0, 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[s], 0u);
  EXPECT_EQ(blk->stats(0).no_status, 1u);
  expect_alive();
}

TEST_F(BlkHostile, StatusByteInReadableDescriptor) {
  // The "status" sits in a device-readable buffer: the device must not write it.
  auto s = raw(virtio::blk_type::in, 0, {{kHdr, 16}, {kSt, 1}}, {});
  auto got = guest.complete(0, 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[s], 0u);
  EXPECT_EQ(guest.status(0, s), 0xee);
  EXPECT_EQ(blk->stats(0).no_status, 1u);
  expect_alive();
}

TEST_F(BlkHostile, DataNotMultipleOf512) {
  auto w = raw(virtio::blk_type::out, 0, {{kHdr, 16}, {kData, 700}}, {{kSt, 1}});
  EXPECT_EQ(guest.run(0, w).first, virtio::kBlkSIoErr);
  auto r = raw(virtio::blk_type::in, 0, {{kHdr, 16}}, {{kData, 511}, {kSt, 1}});
  EXPECT_EQ(guest.run(0, r).first, virtio::kBlkSIoErr);
  expect_alive();
}

TEST_F(BlkHostile, InWithReadableDataBuffers) {
  // IN whose data buffer is device-readable: the device would have to write into it.
  auto s = raw(virtio::blk_type::in, 0, {{kHdr, 16}, {kData, 512}}, {{kSt, 1}});
  auto [st, len] = guest.run(0, s);
  EXPECT_EQ(st, virtio::kBlkSIoErr);
  EXPECT_EQ(len, 1u);
  expect_alive();
}

TEST_F(BlkHostile, OutWithWritableDataBuffers) {
  auto s = raw(virtio::blk_type::out, 0, {{kHdr, 16}}, {{kData, 512}, {kSt, 1}});
  EXPECT_EQ(guest.run(0, s).first, virtio::kBlkSIoErr);
  expect_alive();
}

TEST_F(BlkHostile, UnknownTypeIsUnsupported) {
  for (std::uint32_t type :
       {2u, 3u, 99u, virtio::blk_type::get_lifetime, virtio::blk_type::secure_erase, 0xffffffffu}) {
    auto s = raw(type, 0, {{kHdr, 16}}, {{kSt, 1}});
    auto [st, len] = guest.run(0, s);
    EXPECT_EQ(st, virtio::kBlkSUnsupp) << type;
    EXPECT_EQ(len, 1u);
  }
  expect_alive();
}

TEST_F(BlkHostile, DiscardWithBadSegments) {
  auto seg = [&](std::uint16_t slot, std::uint64_t sector, std::uint32_t n, std::uint32_t flags) {
    virtio::VirtioBlkDiscardWriteZeroes d{sector, n, flags};
    std::memcpy(guest.slot_host(0, slot) + kData, &d, sizeof d);
  };
  struct Case {
    std::uint32_t type;
    std::uint64_t sector;
    std::uint32_t n, flags, len;
    std::uint8_t expect;
  };
  const Case cases[] = {
      {virtio::blk_type::discard, kSectors - 1, 2, 0, 16, virtio::kBlkSIoErr},       // past the end
      {virtio::blk_type::discard, ~std::uint64_t{0}, 8, 0, 16, virtio::kBlkSIoErr},  // wraps
      {virtio::blk_type::discard, 0, 0, 0, 16, virtio::kBlkSIoErr},                  // empty
      {virtio::blk_type::discard, 0, 8, 0, 8, virtio::kBlkSIoErr},         // short segment
      {virtio::blk_type::discard, 0, 8, 0, 32, virtio::kBlkSIoErr},        // two segments
      {virtio::blk_type::discard, 0, 8, 1, 16, virtio::kBlkSUnsupp},       // unmap flag
      {virtio::blk_type::write_zeroes, 0, 8, 2, 16, virtio::kBlkSUnsupp},  // unknown flag
  };
  for (const Case& c : cases) {
    auto slot = guest.take_slot(0);
    ASSERT_TRUE(slot);
    guest.write_hdr(0, *slot, c.type, 0);
    seg(*slot, c.sector, c.n, c.flags);
    const std::uint64_t base = guest.slot_gpa(0, *slot);
    const Buffer out[] = {{base, 16}, {base + kData, c.len}};
    const Buffer in[] = {{base + kSt, 1}};
    ASSERT_TRUE(guest.add_raw(0, *slot, out, in));
    EXPECT_EQ(guest.run(0, *slot).first, c.expect) << c.sector << " " << c.n << " " << c.flags;
  }
  expect_alive();
}

TEST_F(BlkHostile, DiscardNotNegotiatedIsUnsupported) {
  TempImage img2(kImage);
  auto blk2 = open_device(img2.path());
  vhost::Device dev2(*blk2, dev_opts());
  BlkGuest g2(1, kFeatures & ~bit(bf::discard) & ~bit(bf::write_zeroes));
  g2.bring_up(dev2);
  const Bytes img_before = img2.read(0, 4096);
  virtio::VirtioBlkDiscardWriteZeroes d{0, 8, 0};
  Bytes seg(sizeof d);
  std::memcpy(seg.data(), &d, sizeof d);
  auto s = g2.request(0, virtio::blk_type::discard, 0, seg);
  EXPECT_EQ(g2.run(0, *s).first, virtio::kBlkSUnsupp);
  EXPECT_EQ(img2.read(0, 4096), img_before);
}

TEST_F(BlkHostile, ManySmallBadRequestsInOneBatch) {
  // A ring full of bad chains (3 descriptors each in a ring of 128): each answered, none lost.
  std::size_t n = 0;
  while (n < 128 / 3) {
    raw(n % 2 ? virtio::blk_type::in : 77u, kSectors + n, {{kHdr, 16}}, {{kData, 512}, {kSt, 1}});
    ++n;
  }
  auto got = guest.complete(0, n);
  EXPECT_EQ(got.size(), n);
  for (auto& [slot, len] : got) EXPECT_EQ(len, 1u);
  expect_alive();
}

}  // namespace
}  // namespace vhostkit::blk::testing

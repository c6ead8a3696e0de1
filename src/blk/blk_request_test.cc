// parse_blk_request alone: chains built over a plain buffer, every type and every refusal, the
// edges of the sector range, and what parse may write (nothing but the data array).
#include "vhostkit/blk/blk_request.h"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "vhostkit/virtio/blk.h"

namespace vhostkit::blk {
namespace {

using virtio::kBlkSIoErr;
using virtio::kBlkSUnsupp;
using R = BlkRefusalReason;

constexpr std::uint64_t kCapacity = 1024;  // sectors
constexpr std::uint64_t kMaxU64 = std::numeric_limits<std::uint64_t>::max();

BlkLimits limits() {
  BlkLimits l;
  l.capacity = kCapacity;
  l.discard = true;
  l.write_zeroes = true;
  l.max_transfer = 64 << 10;
  l.max_discard_sectors = 256;
  return l;
}

// A chain over one buffer standing for guest memory: pieces are laid out back to back (with a
// gap, so adjacent pieces never look like one), readable first.
class ChainBuilder {
 public:
  ChainBuilder() : mem_(256 << 10, 0xee) {}

  // The next piece, readable or writable, holding `bytes` (readable) or `len` zeros.
  iovec& readable(const void* bytes, std::size_t len) {
    iovec& v = piece(readable_, len);
    std::memcpy(v.iov_base, bytes, len);
    return v;
  }
  iovec& readable(std::size_t len) { return piece(readable_, len); }
  iovec& writable(std::size_t len) { return piece(writable_, len); }

  // A header in one readable piece.
  iovec& header(std::uint32_t type, std::uint64_t sector) {
    const virtio::VirtioBlkOutHdr h{type, 0, sector};
    return readable(&h, sizeof h);
  }
  iovec& segment(std::uint64_t sector, std::uint32_t num_sectors, std::uint32_t flags) {
    const virtio::VirtioBlkDiscardWriteZeroes s{sector, num_sectors, flags};
    return readable(&s, sizeof s);
  }

  BlkChain chain() const {
    BlkChain c{readable_, writable_, 0, 0};
    for (const iovec& v : readable_) c.readable_len += v.iov_len;
    for (const iovec& v : writable_) c.writable_len += v.iov_len;
    return c;
  }

  std::expected<BlkRequest, BlkRefusal> parse(const BlkLimits& l = limits()) {
    return parse_blk_request(chain(), l, out_);
  }

  std::uint8_t* at(const iovec& v, std::size_t off = 0) {
    return static_cast<std::uint8_t*>(v.iov_base) + off;
  }
  const std::vector<std::uint8_t>& memory() const { return mem_; }
  std::span<iovec> out() { return out_; }
  void set_out_size(std::size_t n) { out_.resize(n); }

 private:
  iovec& piece(std::vector<iovec>& list, std::size_t len) {
    list.reserve(64);  // references handed out stay valid
    list.push_back(iovec{mem_.data() + used_, len});
    used_ += len + 64;
    return list.back();
  }

  std::vector<std::uint8_t> mem_;
  std::size_t used_ = 0;
  std::vector<iovec> readable_, writable_;
  std::vector<iovec> out_ = std::vector<iovec>(8);
};

void expect_refused(const std::expected<BlkRequest, BlkRefusal>& r, R why, std::uint8_t answer) {
  ASSERT_FALSE(r.has_value()) << "parsed as " << to_string(r->op);
  EXPECT_EQ(r.error().reason, why) << to_string(r.error().reason);
  EXPECT_EQ(r.error().answer, answer);
}

TEST(BlkRequest, NoWritableByteIsNoStatus) {
  ChainBuilder b;
  b.header(virtio::blk_type::in, 0);
  b.readable(512);
  auto r = b.parse();
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().reason, R::no_status_byte);
  EXPECT_EQ(r.error().status, nullptr);
}

TEST(BlkRequest, EmptyChainIsNoStatus) {
  ChainBuilder b;
  auto r = b.parse();
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().reason, R::no_status_byte);
}

TEST(BlkRequest, StatusIsTheLastWritableByteEvenBeforeEmptyPieces) {
  ChainBuilder b;
  b.header(virtio::blk_type::flush, 0);
  iovec& st = b.writable(3);
  b.writable(0);
  auto r = b.parse();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->status, b.at(st, 2));
}

TEST(BlkRequest, ShortHeaderIsIoErr) {
  ChainBuilder b;
  b.readable(15);
  iovec& st = b.writable(1);
  auto r = b.parse();
  expect_refused(r, R::short_header, kBlkSIoErr);
  EXPECT_EQ(r.error().status, b.at(st));
}

TEST(BlkRequest, HeaderSplitOverPieces) {
  const virtio::VirtioBlkOutHdr h{virtio::blk_type::in, 0, 7};
  const auto* p = reinterpret_cast<const std::uint8_t*>(&h);
  ChainBuilder b;
  b.readable(p, 1);
  b.readable(p + 1, 9);
  b.readable(p + 10, 6);
  iovec& data = b.writable(512);
  b.writable(1);
  auto r = b.parse();
  ASSERT_TRUE(r.has_value()) << to_string(r.error().reason);
  EXPECT_EQ(r->op, BlkOp::read);
  EXPECT_EQ(r->sector, 7u);
  ASSERT_EQ(r->data.size(), 1u);
  EXPECT_EQ(r->data[0].iov_base, data.iov_base);
}

TEST(BlkRequest, Read) {
  ChainBuilder b;
  b.header(virtio::blk_type::in, 9);
  iovec& d1 = b.writable(1024);
  iovec& d2 = b.writable(3072);
  iovec& st = b.writable(1);
  auto r = b.parse();
  ASSERT_TRUE(r.has_value()) << to_string(r.error().reason);
  EXPECT_EQ(r->op, BlkOp::read);
  EXPECT_EQ(r->sector, 9u);
  EXPECT_EQ(r->offset(), 9u * 512);
  EXPECT_EQ(r->length, 4096u);
  ASSERT_EQ(r->data.size(), 2u);
  EXPECT_EQ(r->data.data(), b.out().data());  // in the caller's array
  EXPECT_EQ(r->data[0].iov_base, d1.iov_base);
  EXPECT_EQ(r->data[0].iov_len, 1024u);
  EXPECT_EQ(r->data[1].iov_base, d2.iov_base);
  EXPECT_EQ(r->data[1].iov_len, 3072u);
  EXPECT_EQ(r->status, b.at(st));
}

TEST(BlkRequest, ReadWithStatusInTheDataPiece) {
  ChainBuilder b;
  b.header(virtio::blk_type::in, 0);
  iovec& d = b.writable(513);
  auto r = b.parse();
  ASSERT_TRUE(r.has_value()) << to_string(r.error().reason);
  ASSERT_EQ(r->data.size(), 1u);
  EXPECT_EQ(r->data[0].iov_base, d.iov_base);
  EXPECT_EQ(r->data[0].iov_len, 512u);
  EXPECT_EQ(r->status, b.at(d, 512));
}

TEST(BlkRequest, Write) {
  ChainBuilder b;
  b.header(virtio::blk_type::out, 3);
  iovec& d = b.readable(1536);
  iovec& st = b.writable(1);
  auto r = b.parse();
  ASSERT_TRUE(r.has_value()) << to_string(r.error().reason);
  EXPECT_EQ(r->op, BlkOp::write);
  EXPECT_EQ(r->sector, 3u);
  EXPECT_EQ(r->length, 1536u);
  ASSERT_EQ(r->data.size(), 1u);
  EXPECT_EQ(r->data[0].iov_base, d.iov_base);
  EXPECT_EQ(r->status, b.at(st));
}

TEST(BlkRequest, WriteWithDataInTheHeaderPiece) {
  // Header and data in one piece, the data running on into a second piece.
  std::array<std::uint8_t, 16 + 100> first{};
  const virtio::VirtioBlkOutHdr h{virtio::blk_type::out, 0, 1};
  std::memcpy(first.data(), &h, sizeof h);
  ChainBuilder b;
  iovec& p1 = b.readable(first.data(), first.size());
  iovec& p2 = b.readable(412);
  b.writable(1);
  auto r = b.parse();
  ASSERT_TRUE(r.has_value()) << to_string(r.error().reason);
  EXPECT_EQ(r->length, 512u);
  ASSERT_EQ(r->data.size(), 2u);
  EXPECT_EQ(r->data[0].iov_base, b.at(p1, 16));
  EXPECT_EQ(r->data[0].iov_len, 100u);
  EXPECT_EQ(r->data[1].iov_base, p2.iov_base);
  EXPECT_EQ(r->data[1].iov_len, 412u);
}

TEST(BlkRequest, EmptyTransfersParse) {
  for (std::uint32_t type : {virtio::blk_type::in, virtio::blk_type::out}) {
    ChainBuilder b;
    b.header(type, kCapacity);  // one past the last sector: nothing moves, so nothing is past it
    b.writable(1);
    auto r = b.parse();
    ASSERT_TRUE(r.has_value()) << to_string(r.error().reason);
    EXPECT_EQ(r->length, 0u);
    EXPECT_TRUE(r->data.empty());
  }
}

TEST(BlkRequest, SectorEdges) {
  struct Case {
    std::uint64_t sector;
    std::size_t bytes;
    bool ok;
  };
  const Case cases[] = {
      {kCapacity - 1, 512, true},          // the last sector
      {kCapacity - 2, 1024, true},         // ending at the last sector
      {kCapacity, 512, false},             // one past
      {kCapacity - 1, 1024, false},        // running one past
      {kCapacity + 1, 0, false},           // an empty transfer two past
      {kMaxU64, 512, false},               // wraps
      {kMaxU64 / 512 + 1, 512, false},     // sector * 512 overflows
      {std::uint64_t{1} << 55, 0, false},  // sector * 512 == 2^64
  };
  for (std::uint32_t type : {virtio::blk_type::in, virtio::blk_type::out}) {
    for (const Case& c : cases) {
      ChainBuilder b;
      b.header(type, c.sector);
      if (type == virtio::blk_type::out) {
        b.readable(c.bytes);
        b.writable(1);
      } else {
        b.writable(c.bytes + 1);
      }
      auto r = b.parse();
      if (c.ok) {
        ASSERT_TRUE(r.has_value()) << type << " " << c.sector << " " << c.bytes;
        EXPECT_EQ(r->sector, c.sector);
        EXPECT_LE(r->offset() + r->length, kCapacity * 512);
      } else {
        SCOPED_TRACE(::testing::Message() << type << " " << c.sector << " " << c.bytes);
        expect_refused(r, R::out_of_range, kBlkSIoErr);
      }
    }
  }
}

TEST(BlkRequest, PartialSectors) {
  for (std::size_t bytes : {1u, 511u, 513u, 4095u}) {
    ChainBuilder b;
    b.header(virtio::blk_type::in, 0);
    b.writable(bytes + 1);
    expect_refused(b.parse(), R::partial_sector, kBlkSIoErr);
    ChainBuilder w;
    w.header(virtio::blk_type::out, 0);
    w.readable(bytes);
    w.writable(1);
    expect_refused(w.parse(), R::partial_sector, kBlkSIoErr);
  }
}

TEST(BlkRequest, TooLarge) {
  BlkLimits l = limits();
  l.max_transfer = 4096;
  ChainBuilder b;
  b.header(virtio::blk_type::in, 0);
  b.writable(4096 + 512 + 1);
  expect_refused(b.parse(l), R::too_large, kBlkSIoErr);
  ChainBuilder ok;
  ok.header(virtio::blk_type::in, 0);
  ok.writable(4096 + 1);
  EXPECT_TRUE(ok.parse(l).has_value());
}

TEST(BlkRequest, DataInTheWrongDirection) {
  ChainBuilder b;  // a read carrying readable data
  b.header(virtio::blk_type::in, 0);
  b.readable(512);
  b.writable(513);
  expect_refused(b.parse(), R::misplaced_data, kBlkSIoErr);
  ChainBuilder w;  // a write with writable data before the status
  w.header(virtio::blk_type::out, 0);
  w.readable(512);
  w.writable(513);
  expect_refused(w.parse(), R::misplaced_data, kBlkSIoErr);
}

TEST(BlkRequest, ReadOnly) {
  BlkLimits l = limits();
  l.read_only = true;
  ChainBuilder w;
  w.header(virtio::blk_type::out, 0);
  w.readable(512);
  w.writable(1);
  expect_refused(w.parse(l), R::read_only, kBlkSIoErr);
  ChainBuilder r;
  r.header(virtio::blk_type::in, 0);
  r.writable(513);
  EXPECT_TRUE(r.parse(l).has_value());
  for (std::uint32_t type : {virtio::blk_type::discard, virtio::blk_type::write_zeroes}) {
    ChainBuilder d;
    d.header(type, 0);
    d.segment(0, 8, 0);
    d.writable(1);
    expect_refused(d.parse(l), R::read_only, kBlkSIoErr);
  }
}

TEST(BlkRequest, Flush) {
  ChainBuilder b;
  b.header(virtio::blk_type::flush, kMaxU64);  // the sector means nothing to a flush
  b.writable(1);
  auto r = b.parse();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->op, BlkOp::flush);
  EXPECT_EQ(r->length, 0u);
  EXPECT_TRUE(r->data.empty());
}

TEST(BlkRequest, GetIdTakesUpTo20Bytes) {
  for (std::size_t room : {0u, 5u, 20u, 64u}) {
    ChainBuilder b;
    b.header(virtio::blk_type::get_id, 0);
    iovec& d = b.writable(room + 1);
    auto r = b.parse();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->op, BlkOp::get_id);
    EXPECT_EQ(r->length, std::min<std::size_t>(room, 20));
    EXPECT_EQ(r->status, b.at(d, room));
    std::size_t total = 0;
    for (const iovec& v : r->data) total += v.iov_len;
    EXPECT_EQ(total, r->length);
  }
}

TEST(BlkRequest, UnknownTypesAreUnsupp) {
  for (std::uint32_t type :
       {virtio::blk_type::get_lifetime, virtio::blk_type::secure_erase, 2u, 0xffffffffu}) {
    ChainBuilder b;
    b.header(type, 0);
    iovec& st = b.writable(1);
    auto r = b.parse();
    expect_refused(r, R::unknown_type, kBlkSUnsupp);
    EXPECT_EQ(r.error().status, b.at(st));
  }
}

TEST(BlkRequest, DiscardAndWriteZeroes) {
  for (std::uint32_t type : {virtio::blk_type::discard, virtio::blk_type::write_zeroes}) {
    ChainBuilder b;
    b.header(type, 0);
    b.segment(kCapacity - 8, 8, 0);  // up to the last sector
    b.writable(1);
    auto r = b.parse();
    ASSERT_TRUE(r.has_value()) << to_string(r.error().reason);
    EXPECT_EQ(r->op, type == virtio::blk_type::discard ? BlkOp::discard : BlkOp::write_zeroes);
    EXPECT_EQ(r->sector, kCapacity - 8);
    EXPECT_EQ(r->length, 8u * 512);
    EXPECT_FALSE(r->unmap);
    EXPECT_TRUE(r->data.empty());
  }
}

TEST(BlkRequest, WriteZeroesMayUnmapDiscardMayNot) {
  ChainBuilder z;
  z.header(virtio::blk_type::write_zeroes, 0);
  z.segment(0, 1, virtio::kBlkWriteZeroesFUnmap);
  z.writable(1);
  auto r = z.parse();
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->unmap);
  ChainBuilder d;
  d.header(virtio::blk_type::discard, 0);
  d.segment(0, 1, virtio::kBlkWriteZeroesFUnmap);
  d.writable(1);
  expect_refused(d.parse(), R::unsupported_flags, kBlkSUnsupp);
  ChainBuilder z2;
  z2.header(virtio::blk_type::write_zeroes, 0);
  z2.segment(0, 1, 2);
  z2.writable(1);
  expect_refused(z2.parse(), R::unsupported_flags, kBlkSUnsupp);
}

TEST(BlkRequest, DiscardNotNegotiatedIsUnsupp) {
  BlkLimits l = limits();
  l.discard = false;
  l.write_zeroes = false;
  l.read_only = true;  // the feature is checked first
  for (std::uint32_t type : {virtio::blk_type::discard, virtio::blk_type::write_zeroes}) {
    ChainBuilder b;
    b.header(type, 0);
    b.segment(0, 8, 0);
    b.writable(1);
    expect_refused(b.parse(l), R::not_negotiated, kBlkSUnsupp);
  }
}

TEST(BlkRequest, DiscardSegmentShape) {
  ChainBuilder two;  // two segments
  two.header(virtio::blk_type::discard, 0);
  two.segment(0, 1, 0);
  two.segment(8, 1, 0);
  two.writable(1);
  expect_refused(two.parse(), R::bad_segment, kBlkSIoErr);
  ChainBuilder half;  // half a segment
  half.header(virtio::blk_type::discard, 0);
  half.readable(8);
  half.writable(1);
  expect_refused(half.parse(), R::bad_segment, kBlkSIoErr);
  ChainBuilder in;  // writable bytes before the status
  in.header(virtio::blk_type::discard, 0);
  in.segment(0, 1, 0);
  in.writable(2);
  expect_refused(in.parse(), R::bad_segment, kBlkSIoErr);
  // A segment split over pieces, one of them shared with the header, is one segment.
  std::array<std::uint8_t, 32> bytes{};
  const virtio::VirtioBlkOutHdr h{virtio::blk_type::discard, 0, 0};
  const virtio::VirtioBlkDiscardWriteZeroes s{4, 2, 0};
  std::memcpy(bytes.data(), &h, sizeof h);
  std::memcpy(bytes.data() + 16, &s, sizeof s);
  ChainBuilder split;
  split.readable(bytes.data(), 20);
  split.readable(bytes.data() + 20, 12);
  split.writable(1);
  auto r = split.parse();
  ASSERT_TRUE(r.has_value()) << to_string(r.error().reason);
  EXPECT_EQ(r->sector, 4u);
  EXPECT_EQ(r->length, 1024u);
}

TEST(BlkRequest, DiscardSectorCountAndRange) {
  struct Case {
    std::uint64_t sector;
    std::uint32_t num;
    R why;
  };
  const Case cases[] = {
      {0, 0, R::bad_sector_count},
      {0, 257, R::bad_sector_count},  // max_discard_sectors + 1
      {kCapacity - 1, 2, R::out_of_range},
      {kCapacity, 1, R::out_of_range},
      {kMaxU64, 1, R::out_of_range},
  };
  for (const Case& c : cases) {
    ChainBuilder b;
    b.header(virtio::blk_type::discard, 0);
    b.segment(c.sector, c.num, 0);
    b.writable(1);
    SCOPED_TRACE(::testing::Message() << c.sector << " " << c.num);
    expect_refused(b.parse(), c.why, kBlkSIoErr);
  }
  ChainBuilder last;
  last.header(virtio::blk_type::discard, 0);
  last.segment(kCapacity - 1, 1, 0);
  last.writable(1);
  EXPECT_TRUE(last.parse().has_value());
}

TEST(BlkRequest, UnsupportedFlagsAnsweredBeforeTheSectorCount) {
  // UNSUPP and IOERR at once: the flags are checked first, as the device always did.
  ChainBuilder b;
  b.header(virtio::blk_type::write_zeroes, 0);
  b.segment(kMaxU64, 0, 4);
  b.writable(1);
  expect_refused(b.parse(), R::unsupported_flags, kBlkSUnsupp);
}

TEST(BlkRequest, MorePiecesThanTheArrayHolds) {
  ChainBuilder b;
  b.set_out_size(2);
  b.header(virtio::blk_type::in, 0);
  b.writable(512);
  b.writable(512);
  b.writable(512);
  b.writable(1);
  expect_refused(b.parse(), R::too_many_pieces, kBlkSIoErr);
  b.set_out_size(3);
  EXPECT_TRUE(b.parse().has_value());
}

TEST(BlkRequest, WritesNothingButTheDataArray) {
  ChainBuilder b;
  b.header(virtio::blk_type::in, 0);
  b.writable(4096);
  b.writable(1);
  const std::vector<std::uint8_t> before = b.memory();
  ASSERT_TRUE(b.parse().has_value());
  EXPECT_EQ(b.memory(), before);
  ChainBuilder bad;
  bad.header(virtio::blk_type::discard, 0);
  bad.segment(0, 0, 0);
  bad.writable(1);
  const std::vector<std::uint8_t> before_bad = bad.memory();
  ASSERT_FALSE(bad.parse().has_value());
  EXPECT_EQ(bad.memory(), before_bad);
}

}  // namespace
}  // namespace vhostkit::blk

// Mergeable rx buffers (VIRTIO_NET_F_MRG_RXBUF) into many small buffers: the guest posts
// 128-byte rx chains and one frame is spread over as many as it needs (virtio 1.2, 5.1.6.4).
// For a frame of L bytes the device writes the 12-byte header then the frame: L + 12 bytes over
// ceil((L + 12) / 128) chains, each used entry's len what that chain got (128 for all but the
// last), num_buffers in the first chain's header, the entries consecutive in the used ring in
// the order the chains were posted. A 1514-byte frame takes 1526 bytes: 11 full chains and 118
// bytes of a 12th.
//
// A frame that needs more chains than the guest posted is dropped and counted; every chain it
// consumed comes back with used len 0, which a driver drops ("short packet" in Linux), so no
// partial frame is ever accepted. Checked by byte, with guard bytes behind every buffer.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>

#include "testing/net_rig.h"
#include "vhostkit/net/net_device.h"

namespace vhostkit::net {
namespace {

using namespace testing;
using vhost::PollMode;
using Used = virtq::DriverQueue::Used;

constexpr std::uint16_t kTxq = 0, kRxq = 1;  // the rig's names for pair 0's rings
constexpr std::uint8_t kGuard = 0xcc;
constexpr std::size_t kHdr = 12;
constexpr std::size_t kSlotSpan = 256;  // guarded bytes per posted chain (buffers + behind them)

std::size_t chains_for(std::size_t frame, std::size_t chain_bytes) {
  return (frame + kHdr + chain_bytes - 1) / chain_bytes;
}

// A device with an in-memory port (frames injected from the host side) or the loopback (frames
// the guest transmits come back with the MACs swapped).
struct MrgRig : DeviceRig {
  explicit MrgRig(bool loopback) : DeviceRig(!loopback, false, kBase | kEventIdx | kMrg) {}

  // Posts `n` rx chains of the given writable buffer sizes, every byte of each slot's first
  // kSlotSpan set to kGuard; returns their slots in posting order.
  std::vector<std::uint16_t> post(std::size_t n, const std::vector<std::uint32_t>& sizes) {
    std::vector<std::uint16_t> slots;
    for (std::size_t i = 0; i < n; ++i) {
      auto s = g.add_raw(kRxq, {}, sizes);
      EXPECT_TRUE(s.has_value());
      if (!s) break;
      std::memset(g.host(g.slot_gpa(kRxq, *s)), kGuard, kSlotSpan);
      slots.push_back(*s);
    }
    g.kick(kRxq);
    return slots;
  }

  // Sends `frame` into the device's rx path.
  void deliver(const Bytes& frame, std::size_t tx_pieces = 1) {
    if (port != nullptr) {
      port->inject(frame);
      return;
    }
    ASSERT_TRUE(g.send(kTxq, frame, tx_pieces));
    g.kick(kTxq);
  }
  Bytes expected(const Bytes& frame) const { return port ? frame : mac_swapped(frame); }

  // Collects rx used entries until `n` arrived (or 20 s passed).
  std::vector<Used> used(std::size_t n) {
    std::vector<Used> got;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (got.size() < n && std::chrono::steady_clock::now() < deadline) {
      for (auto& u : g.reclaim(kRxq)) got.push_back(u);
      if (got.size() < n) g.wait_call(kRxq, 10);
    }
    return got;
  }
};

struct Case {
  bool loopback;
  std::vector<std::uint32_t> sizes;  // one rx chain's writable buffers
  std::size_t frame;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << (c.loopback ? "loopback" : "port") << ", " << c.frame << "-byte frame, chain of";
  for (auto s : c.sizes) *os << " " << s;
}

class Mergeable : public ::testing::TestWithParam<Case> {};

// One frame over exactly as many chains as it needs: every used entry, every byte.
TEST_P(Mergeable, FrameSpreadOverSmallChains) {
  const Case c = GetParam();
  MrgRig r(c.loopback);
  std::uint32_t chain_bytes = 0;
  for (auto s : c.sizes) chain_bytes += s;
  const std::size_t want = chains_for(c.frame, chain_bytes);
  // Exactly enough chains, and two more that must stay untouched.
  const auto slots = r.post(want + 2, c.sizes);
  ASSERT_EQ(slots.size(), want + 2);
  std::mt19937 rng(static_cast<std::uint32_t>(c.frame));
  const Bytes frame = random_frame(rng, c.frame);
  r.deliver(frame, 3);
  const auto used = r.used(want);
  ASSERT_EQ(used.size(), want);

  Bytes all;
  std::size_t left = kHdr + c.frame;
  for (std::size_t i = 0; i < want; ++i) {
    SCOPED_TRACE("used entry " + std::to_string(i));
    EXPECT_EQ(used[i].token, slots[i]) << "chains used out of posting order";
    const std::size_t len = std::min<std::size_t>(left, chain_bytes);
    EXPECT_EQ(used[i].len, len);
    left -= len;
    const Bytes b = r.g.rx_bytes(kRxq, used[i], c.sizes);
    ASSERT_EQ(b.size(), used[i].len);
    all.insert(all.end(), b.begin(), b.end());
    // Nothing written past this chain's len: its buffers' tails and the gaps after them.
    std::uint64_t gpa = r.g.slot_gpa(kRxq, slots[i]);
    std::size_t chain_off = 0;
    std::size_t written = used[i].len;
    for (auto s : c.sizes) {
      const std::size_t in_this = std::min<std::size_t>(written, s);
      written -= in_this;
      const std::uint64_t next = gpa + ((s + 63) & ~std::uint64_t{63});
      for (std::uint64_t a = gpa + in_this; a < next; ++a) {
        ASSERT_EQ(*r.g.host(a), kGuard) << "byte " << (a - gpa) + chain_off << " written";
      }
      chain_off += next - gpa;
      gpa = next;
    }
    for (std::uint64_t a = gpa; a < r.g.slot_gpa(kRxq, slots[i]) + kSlotSpan; ++a) {
      ASSERT_EQ(*r.g.host(a), kGuard) << "written beyond the chain's buffers";
    }
  }
  EXPECT_EQ(left, 0u);
  ASSERT_EQ(all.size(), kHdr + c.frame);
  EXPECT_EQ(Bytes(all.begin(), all.begin() + 10), Bytes(10, 0)) << "flags, gso, csum fields";
  std::uint16_t num_buffers = 0;
  std::memcpy(&num_buffers, all.data() + 10, 2);
  EXPECT_EQ(num_buffers, want);
  EXPECT_EQ(Bytes(all.begin() + kHdr, all.end()), r.expected(frame));
  // The two spare chains are still the device's, untouched.
  for (std::size_t i = want; i < slots.size(); ++i) {
    const std::uint8_t* p = r.g.host(r.g.slot_gpa(kRxq, slots[i]));
    EXPECT_EQ(Bytes(p, p + kSlotSpan), Bytes(kSlotSpan, kGuard)) << "spare chain " << i;
  }
  const NetStats s = r.net.stats(0);
  EXPECT_EQ(s.rx_frames, 1u);
  EXPECT_EQ(s.rx_bytes, c.frame);
  EXPECT_EQ(s.rx_drops + s.rx_errors, 0u);
  EXPECT_FALSE(r.dev.broken());
}

std::string case_name(const ::testing::TestParamInfo<Case>& i) {
  std::string n =
      std::string(i.param.loopback ? "loopback" : "port") + "_" + std::to_string(i.param.frame);
  for (auto s : i.param.sizes) n += "_" + std::to_string(s);
  return n;
}

// Frames that need more than one chain: 1514 + 12 over 128-byte chains takes 12 of them, the
// last holding 118 bytes (the case); the lengths on either side of a chain boundary
// (1524 fills 12 exactly, 1525 needs 13); rx chains of two descriptors (100 + 28); both rx paths
// (port, loopback).
const auto kMultiChain =
    ::testing::Values(Case{false, {128}, 1514}, Case{true, {128}, 1514}, Case{false, {128}, 1524},
                      Case{false, {128}, 1525}, Case{true, {128}, 1525},
                      Case{false, {100, 28}, 1514}, Case{true, {100, 28}, 1514});
INSTANTIATE_TEST_SUITE_P(Shapes, Mergeable, kMultiChain, case_name);
// And a frame that fits one chain still says num_buffers 1.
INSTANTIATE_TEST_SUITE_P(OneChain, Mergeable, ::testing::Values(Case{false, {128}, 60}), case_name);

TEST(MergeableCount, FifteenHundredFourteenBytesTakeTwelve128ByteChains) {
  EXPECT_EQ(chains_for(1514, 128), 12u);
}

// One chain short of what the frame needs: the frame is dropped and counted, all the chains it
// took come back with len 0, and the device goes on with the next frame.
class MergeableShort : public ::testing::TestWithParam<Case> {};

TEST_P(MergeableShort, FrameNeedingMoreChainsThanPostedIsDropped) {
  const Case c = GetParam();
  MrgRig r(c.loopback);
  std::uint32_t chain_bytes = 0;
  for (auto s : c.sizes) chain_bytes += s;
  const std::size_t want = chains_for(c.frame, chain_bytes);
  const auto slots = r.post(want - 1, c.sizes);
  std::mt19937 rng(5);
  r.deliver(random_frame(rng, c.frame));
  const auto used = r.used(want - 1);
  ASSERT_EQ(used.size(), want - 1);
  for (std::size_t i = 0; i < used.size(); ++i) {
    EXPECT_EQ(used[i].token, slots[i]);
    EXPECT_EQ(used[i].len, 0u) << "chain " << i << " of a dropped frame reported written bytes";
  }
  NetStats s = r.net.stats(0);
  EXPECT_EQ(s.rx_frames, 0u);
  EXPECT_EQ(s.rx_drops, 1u);
  if (c.loopback) {
    EXPECT_EQ(s.tx_drops, 1u);
  }

  // A driver that follows the spec (testing/net_rig.h's Receiver) sees no frame in those entries;
  // with enough chains the next frame arrives whole.
  const auto more = r.post(want, c.sizes);
  const Bytes next = random_frame(rng, c.frame);
  r.deliver(next);
  const auto used2 = r.used(want);
  ASSERT_EQ(used2.size(), want);
  Bytes all;
  for (std::size_t i = 0; i < want; ++i) {
    EXPECT_EQ(used2[i].token, more[i]);
    const Bytes b = r.g.rx_bytes(kRxq, used2[i], c.sizes);
    all.insert(all.end(), b.begin(), b.end());
  }
  ASSERT_EQ(all.size(), kHdr + c.frame);
  std::uint16_t num_buffers = 0;
  std::memcpy(&num_buffers, all.data() + 10, 2);
  EXPECT_EQ(num_buffers, want);
  EXPECT_EQ(Bytes(all.begin() + kHdr, all.end()), r.expected(next));
  s = r.net.stats(0);
  EXPECT_EQ(s.rx_frames, 1u);
  EXPECT_EQ(s.rx_drops, 1u);
  EXPECT_FALSE(r.dev.broken());
}

INSTANTIATE_TEST_SUITE_P(Shapes, MergeableShort, kMultiChain, case_name);

}  // namespace
}  // namespace vhostkit::net

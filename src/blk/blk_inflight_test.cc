// Inflight I/O tracking on the blk device (vhost-user INFLIGHT_SHMFD): every request recorded in
// the region while it runs, nothing left marked once answered, and a restarted device answering
// the requests its predecessor left in flight, in their order, before any new one, each exactly
// once, with the data where it belongs. On both I/O paths.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <map>
#include <vector>

#include "testing/blk_rig.h"
#include "vhostkit/vhost/inflight.h"
#include "vhostkit/virtq/iov.h"

namespace vhostkit::blk::testing {
namespace {

using virtio::kBlkSOk;
namespace bt = virtio::blk_type;

constexpr std::size_t kImage = 1 << 20;
constexpr std::uint16_t kRing = 128;

// The region as the front-end keeps it (its fd), and each back-end's own mapping of it.
std::unique_ptr<vhost::InflightRegion> attach(const vhost::InflightRegion& r) {
  auto a = vhost::InflightRegion::attach(dup_fd(r.fd()), r.mmap_size(), r.mmap_offset(),
                                         vhost::InflightLayout::split, 1, kRing);
  EXPECT_TRUE(a.has_value()) << a.error().message();
  return a ? std::make_unique<vhost::InflightRegion>(std::move(*a)) : nullptr;
}

// Owner, features, the table and the region, then ring 0 (from scratch, or resumed at a base).
void bring_up(BlkGuest& g, vhost::Device& dev, const vhost::InflightRegion& region,
              std::optional<std::uint16_t> resume = std::nullopt) {
  ASSERT_TRUE(dev.set_owner().has_value());
  ASSERT_TRUE(dev.set_features(g.features()).has_value());
  ASSERT_TRUE(dev.set_mem_table(g.table()).has_value());
  auto r = dev.set_inflight("test", attach(region));
  ASSERT_TRUE(r.has_value()) << r.error().message();
  g.configure(dev, 0, true, resume);
}

// A back-end that died with requests in flight: it records every chain in the region as blk
// does, answers the flushes (status OK, no I/O needed) and never the reads and writes, which it
// leaves in flight behind the flushes it answered.
class DiesWithDataInFlight : public vhost::DeviceBackend {
 public:
  std::uint64_t features() const noexcept override { return kFeatures; }
  std::uint16_t num_queues() const noexcept override { return 1; }
  bool tracks_inflight() const noexcept override { return true; }
  bool handle_queue(vhost::Queue& q) noexcept override {
    auto& vq = q.vq();
    bool did = false;
    std::array<iovec, 8> segs;
    while (vq.pending() > 0) {
      auto c = vq.pop(segs);
      if (!c) return did;
      did = true;
      q.inflight()->submit(c->head);
      virtio::VirtioBlkOutHdr h{};
      virtq::iov_read(c->readable, 0, &h, sizeof h);
      if (h.type != bt::flush) {
        ++held;
        continue;
      }
      const iovec& status = c->writable.back();
      *static_cast<std::uint8_t*>(status.iov_base) = kBlkSOk;
      vq.push_used(c->head, 1);
      q.inflight()->used(c->head);
    }
    if (did) q.publish_and_notify();
    return did;
  }
  std::atomic<unsigned> held{0};
};

// Used entries of ring 0 in the order the device wrote them, waited for (bounded).
std::vector<std::uint16_t> used_in_order(BlkGuest& g, std::size_t n) {
  std::vector<std::uint16_t> got;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  g.kick(0);
  while (got.size() < n && std::chrono::steady_clock::now() < deadline) {
    while (auto u = g.driver(0).get_used()) got.push_back(static_cast<std::uint16_t>(u->token));
    if (got.size() < n) g.wait_call(0, 20);
  }
  return got;
}

// Nothing in flight, and the region's used index is the ring's: what a clean stop leaves.
void expect_region_clean(const vhost::InflightRegion& region, std::uint16_t ring_used) {
  auto* base = static_cast<std::uint8_t*>(
      ::mmap(nullptr, region.mmap_size(), PROT_READ, MAP_SHARED, region.fd(), 0));
  ASSERT_NE(base, MAP_FAILED);
  vhost::InflightSplitHeader h;
  std::memcpy(&h, base, sizeof h);
  EXPECT_EQ(h.version, vhost::kInflightVersion);
  EXPECT_EQ(h.desc_num, kRing);
  EXPECT_EQ(h.used_idx, ring_used);
  for (std::uint16_t i = 0; i < kRing; ++i) {
    vhost::InflightSplitDesc d;
    std::memcpy(&d, base + sizeof h + i * sizeof d, sizeof d);
    EXPECT_EQ(d.inflight, 0) << "head " << i;
  }
  ::munmap(base, region.mmap_size());
}

class BlkInflight : public ::testing::TestWithParam<IoPath> {};

// Every chain is recorded, bad ones too (the count of heads taken must be what recovery
// computes), and nothing stays marked once the answers are published.
TEST_P(BlkInflight, RecordsEveryRequestAndClearsItOnceAnswered) {
  TempImage img(kImage);
  auto region = vhost::InflightRegion::allocate(vhost::InflightLayout::split, 1, kRing);
  ASSERT_TRUE(region.has_value());
  BlkGuest g(1);
  auto blk = open_device(img.path(), false, 1, true, GetParam());
  ASSERT_TRUE(blk);
  vhost::Device dev(*blk, dev_opts());
  bring_up(g, dev, *region);
  if (HasFatalFailure()) return;
  std::size_t chains = 0;
  for (int round = 0; round < 3; ++round) {
    std::vector<std::uint16_t> slots;
    for (std::uint32_t i = 0; i < 20; ++i) {
      auto s = i % 3 == 0   ? g.request(0, bt::out, i * 8, pattern(4096, i))
               : i % 3 == 1 ? g.request(0, bt::in, i * 8, {}, 4096)
                            : g.request(0, bt::flush, 0, {});
      ASSERT_TRUE(s.has_value());
      slots.push_back(*s);
    }
    // Refused by parse: a sector past the end, and a chain with no status byte.
    auto bad = g.request(0, bt::in, kImage / 512, {}, 512);
    ASSERT_TRUE(bad.has_value());
    auto nostatus = g.take_slot(0);
    ASSERT_TRUE(nostatus.has_value());
    g.write_hdr(0, *nostatus, bt::in, 0);
    const Buffer hdr{g.slot_gpa(0, *nostatus), 16};
    ASSERT_TRUE(g.add_raw(0, *nostatus, {&hdr, 1}, {}));
    // A chain the ring itself refuses (a buffer outside guest memory): answered by the queue.
    auto unmapped = g.take_slot(0);
    ASSERT_TRUE(unmapped.has_value());
    const Buffer outside[] = {{g.slot_gpa(0, *unmapped), 16}, {g.mem_size() + 4096, 512}};
    const Buffer st{g.slot_gpa(0, *unmapped) + BlkGuest::kStatusOff, 1};
    ASSERT_TRUE(g.add_raw(0, *unmapped, outside, {&st, 1}));
    chains += 23;
    auto got = g.complete(0, 23);
    ASSERT_EQ(got.size(), 23u);
    EXPECT_EQ(got[*unmapped], 0u);
    for (std::uint16_t s : slots) EXPECT_EQ(g.status(0, s), kBlkSOk);
    EXPECT_NE(g.status(0, *bad), kBlkSOk);
  }
  const vhost::InflightSplitQueue* iq = dev.inflight()->split_queue(0);
  ASSERT_NE(iq, nullptr);
  EXPECT_EQ(iq->next_counter(), chains);
  EXPECT_EQ(iq->misuse(), 0u);
  expect_region_clean(*region, g.driver(0).split().used()->idx);
}

// The restart: writes and a read held by the first back-end behind flushes it answered; the
// second (the real device, same region, base = the ring's used index as QEMU sends it) answers
// the held ones first and in order, then new ones; each once, the data in place.
TEST_P(BlkInflight, RestartedDeviceAnswersWhatWasLeftInFlightOnceInOrder) {
  TempImage img(kImage);
  const Bytes before = img.read(0, kImage);
  auto region = vhost::InflightRegion::allocate(vhost::InflightLayout::split, 1, kRing);
  ASSERT_TRUE(region.has_value());
  BlkGuest g(1);
  const Bytes w0 = pattern(8192, 100), w2 = pattern(4096, 102);
  std::map<std::uint16_t, int> answers;
  std::uint16_t s0, s1, s2, s3, s4, s5;
  std::uint16_t used_idx = 0;
  {
    DiesWithDataInFlight first;
    vhost::Device dev(first, dev_opts());
    bring_up(g, dev, *region);
    if (HasFatalFailure()) return;
    s0 = *g.request(0, bt::out, 16, w0);
    s1 = *g.request(0, bt::flush, 0, {});
    s2 = *g.request(0, bt::out, 64, w2, 0, 2);
    s3 = *g.request(0, bt::flush, 0, {});
    s4 = *g.request(0, bt::in, 200, {}, 4096, 3);
    s5 = *g.request(0, bt::flush, 0, {});
    auto got = used_in_order(g, 3);
    EXPECT_EQ(got, (std::vector<std::uint16_t>{s1, s3, s5}));
    for (auto s : got) ++answers[s];
    EXPECT_EQ(first.held.load(), 3u);
    used_idx = g.driver(0).split().used()->idx;
    // The device goes away without answering: nothing of the held writes reached the image.
  }
  ASSERT_EQ(used_idx, 3);
  EXPECT_EQ(img.read(0, kImage), before);

  // New requests wait on the ring behind them before the device starts.
  const Bytes w6 = pattern(4096, 106);
  const auto s6 = *g.request(0, bt::out, 300, w6);
  const auto s7 = *g.request(0, bt::in, 400, {}, 8192);
  g.kick(0);

  auto blk = open_device(img.path(), false, 1, true, GetParam());
  ASSERT_TRUE(blk);
  vhost::Device dev(*blk, dev_opts());
  bring_up(g, dev, *region, used_idx);
  if (HasFatalFailure()) return;
  auto got = used_in_order(g, 5);
  ASSERT_EQ(got.size(), 5u);
  for (auto s : got) ++answers[s];
  if (GetParam() == IoPath::inline_call) {
    // Each request answered before the next starts: the answers show the order they started.
    EXPECT_EQ(got, (std::vector<std::uint16_t>{s0, s2, s4, s6, s7}));
  }
  for (auto s : {s0, s2, s4, s6, s7}) EXPECT_EQ(g.status(0, s), kBlkSOk) << "slot " << s;
  EXPECT_EQ(img.read(16 * 512, w0.size()), w0);
  EXPECT_EQ(img.read(64 * 512, w2.size()), w2);
  EXPECT_EQ(img.read(300 * 512, w6.size()), w6);
  EXPECT_EQ(g.data(0, s4, 4096), img.read(200 * 512, 4096));
  EXPECT_EQ(g.data(0, s7, 8192), img.read(400 * 512, 8192));
  for (auto s : {s0, s1, s2, s3, s4, s5, s6, s7}) EXPECT_EQ(answers[s], 1) << "slot " << s;
  EXPECT_EQ(g.driver(0).bad_used(), 0u);
  const BlkStats st = blk->stats(0);
  EXPECT_EQ(st.writes, 3u);
  EXPECT_EQ(st.reads, 2u);
  EXPECT_EQ(dev.inflight()->split_queue(0)->misuse(), 0u);
  expect_region_clean(*region, g.driver(0).split().used()->idx);
}

INSTANTIATE_TEST_SUITE_P(Paths, BlkInflight, ::testing::Values(IoPath::uring, IoPath::inline_call),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace vhostkit::blk::testing

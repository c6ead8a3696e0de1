// BlkDevice on packed rings (VIRTIO_F_RING_PACKED), on both I/O paths, and IN_ORDER where it is
// offered (the inline path: see BlkOptions::in_order).
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <vector>

#include "testing/blk_rig.h"
#include "testing/dirty_log.h"

namespace vhostkit::blk::testing {
namespace {

constexpr std::size_t kImage = 4 << 20;  // 8192 sectors
constexpr std::uint64_t kPacked = bit(virtio::feature::ring_packed);
constexpr std::uint64_t kInOrder = bit(virtio::feature::in_order);

// A packed guest on a buffered image (O_DIRECT is blk_device_test's business) in /tmp.
struct PackedRig {
  PackedRig(IoPath io, std::uint64_t extra, std::uint16_t ring_size = 100)
      : img(kImage, "/tmp"),
        blk(open_device(img.path(), false, 1, /*direct=*/false, io)),
        dev(*blk, dev_opts()),
        guest(1, kFeatures | kPacked | extra, ring_size) {
    guest.bring_up(dev);
  }
  TempImage img;
  std::unique_ptr<BlkDevice> blk;
  vhost::Device dev;
  BlkGuest guest;
};

class BlkPacked : public ::testing::TestWithParam<IoPath> {};

INSTANTIATE_TEST_SUITE_P(Path, BlkPacked, ::testing::Values(IoPath::uring, IoPath::inline_call),
                         [](const auto& i) {
                           return i.param == IoPath::uring ? "uring" : "inline";
                         });

TEST_P(BlkPacked, FeaturesFollowTheIoPath) {
  TempImage img(kImage, "/tmp");
  auto d = open_device(img.path(), false, 1, false, GetParam());
  EXPECT_TRUE(virtio::has(d->features(), virtio::feature::ring_packed));
  // io_uring answers in completion order: IN_ORDER only on the inline path.
  EXPECT_EQ(virtio::has(d->features(), virtio::feature::in_order),
            GetParam() == IoPath::inline_call);
  BlkOptions o;
  o.image = img.path();
  o.io = GetParam();
  o.packed = false;
  o.in_order = false;
  auto refused = BlkDevice::open(o);
  ASSERT_TRUE(refused.has_value());
  EXPECT_FALSE(virtio::has((*refused)->features(), virtio::feature::ring_packed));
  EXPECT_FALSE(virtio::has((*refused)->features(), virtio::feature::in_order));
}

// 600 requests, up to 12 in flight, on a ring of 100 (not a power of two; the wrap counters
// flip on every lap): writes land in the image, reads bring back what the image holds.
TEST_P(BlkPacked, RandomIoOverManyLaps) {
  const bool in_order = GetParam() == IoPath::inline_call;
  PackedRig r(GetParam(), in_order ? kInOrder : 0);
  ASSERT_TRUE(r.dev.queue(0).packed());
  std::mt19937 rng(11);
  Bytes shadow = r.img.read(0, kImage);
  struct Req {
    bool write;
    std::uint64_t sector;
    std::size_t len;
  };
  std::map<std::uint16_t, Req> inflight;
  std::size_t done = 0, bad = 0;
  auto drain = [&](std::size_t want) {
    auto got = r.guest.complete(0, want);
    if (got.size() < want) return false;
    for (auto& [slot, len] : got) {
      const Req q = inflight.at(slot);
      inflight.erase(slot);
      ++done;
      if (r.guest.status(0, slot) != virtio::kBlkSOk) ++bad;
      if (!q.write && (len != q.len + 1 || r.guest.data(0, slot, q.len) !=
                                               Bytes(shadow.begin() + q.sector * 512,
                                                     shadow.begin() + q.sector * 512 + q.len))) {
        ++bad;
      }
    }
    return true;
  };
  for (std::size_t issued = 0; issued < 600;) {
    const bool write = rng() % 2;
    const std::size_t len = (1 + rng() % 64) * 512;
    const std::uint64_t sector = rng() % (kImage / 512 - len / 512 + 1);
    bool overlap = false;
    for (auto& [k, q] : inflight) {
      overlap |= (write || q.write) && sector * 512 < q.sector * 512 + q.len &&
                 q.sector * 512 < sector * 512 + len;
    }
    if (inflight.size() >= 12 || overlap) {  // up to 6 descriptors each, ring of 100
      ASSERT_TRUE(drain(1)) << "done " << done;
      continue;
    }
    std::optional<std::uint16_t> slot;
    if (write) {
      const Bytes data = pattern(len, static_cast<std::uint32_t>(rng()));
      std::copy(data.begin(), data.end(), shadow.begin() + sector * 512);
      slot = r.guest.request(0, virtio::blk_type::out, sector, data, 0, 1 + rng() % 4);
    } else {
      slot = r.guest.request(0, virtio::blk_type::in, sector, {}, static_cast<std::uint32_t>(len),
                             1 + rng() % 4);
    }
    ASSERT_TRUE(slot);
    inflight[*slot] = {write, sector, len};
    ++issued;
    if (issued % 8 == 0) r.guest.kick(0);
  }
  while (!inflight.empty()) ASSERT_TRUE(drain(inflight.size()));
  EXPECT_EQ(done, 600u);
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(r.img.read(0, kImage), shadow);
  EXPECT_EQ(r.guest.driver(0).bad_used(), 0u);
  EXPECT_FALSE(r.dev.broken());
}

// Live migration on a packed ring: a read's data and its status byte are marked.
TEST_P(BlkPacked, DirtyLogMarksReadDataAndStatus) {
  PackedRig r(GetParam(), 0);
  vhostkit::testing::SharedLog log;
  ASSERT_TRUE(log.ok());
  r.dev.add_offered_features(virtio::bit(virtio::feature::log_all));
  ASSERT_TRUE(r.dev.set_log_base(log.fd(), log.size(), 0));
  ASSERT_TRUE(r.dev.set_features(kFeatures | kPacked | virtio::bit(virtio::feature::log_all)));
  auto rd = r.guest.request(0, virtio::blk_type::in, 8, {}, 64 * 1024, 3);
  ASSERT_TRUE(rd);
  EXPECT_EQ(r.guest.run(0, *rd).first, virtio::kBlkSOk);
  EXPECT_EQ(r.guest.data(0, *rd, 64 * 1024), r.img.read(8 * 512, 64 * 1024));
  const std::uint64_t base = r.guest.slot_gpa(0, *rd);
  EXPECT_TRUE(log.dirty(base + BlkGuest::kStatusOff));
  EXPECT_TRUE(log.all_dirty(base + BlkGuest::kDataOff, 64 * 1024));
}

}  // namespace
}  // namespace vhostkit::blk::testing

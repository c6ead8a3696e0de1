// BlkDriver without a back-end: option checks and the config space a hostile back-end may send.
// (Against a real vhostkit-blk device: tests/integration/blk_driver_pair_test.cc.)
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "vhostkit/driver/blk_driver.h"

namespace vhostkit::driver {
namespace {

namespace bf = virtio::blk_feature;
using virtio::bit;

std::vector<std::uint8_t> config(std::uint64_t capacity, std::uint32_t blk_size = 512,
                                 std::uint16_t num_queues = 1, std::uint32_t seg_max = 126,
                                 std::uint32_t size_max = 1u << 20) {
  virtio::VirtioBlkConfig c{};
  c.size_max = size_max;
  c.capacity = capacity;
  c.blk_size = blk_size;
  c.num_queues = num_queues;
  c.seg_max = seg_max;
  std::vector<std::uint8_t> out(BlkDriver::kConfigBytes);
  std::memcpy(out.data(), &c, out.size());
  return out;
}

constexpr std::uint64_t kAll =
    bit(bf::blk_size) | bit(bf::seg_max) | bit(bf::mq) | bit(bf::flush) | bit(bf::size_max);

BlkDriverOptions opts() {
  BlkDriverOptions o;
  o.socket_path = "/nonexistent/x.sock";
  return o;
}

TEST(BlkDriverConfig, ReadsWhatTheFeaturesAllow) {
  auto i = BlkDriver::parse_config(config(2048, 4096, 4, 126), kAll);
  ASSERT_TRUE(i) << i.error().message();
  EXPECT_EQ(i->capacity, 2048u);
  EXPECT_EQ(i->blk_size, 4096u);
  EXPECT_EQ(i->num_queues, 4u);
  EXPECT_EQ(i->seg_max, 126u);
  EXPECT_EQ(i->size_max, 1u << 20);
  EXPECT_TRUE(i->flush);
  EXPECT_FALSE(i->read_only);
}

TEST(BlkDriverConfig, FieldsOfUnackedFeaturesAreIgnored) {
  // Garbage in blk_size and num_queues does not matter when BLK_SIZE and MQ are not acked.
  auto i = BlkDriver::parse_config(config(8, 12345, 0, 7), bit(bf::ro));
  ASSERT_TRUE(i) << i.error().message();
  EXPECT_EQ(i->blk_size, 512u);
  EXPECT_EQ(i->num_queues, 1u);
  EXPECT_EQ(i->seg_max, 0u);
  EXPECT_EQ(i->size_max, 0u);
  EXPECT_TRUE(i->read_only);
  EXPECT_FALSE(i->flush);
}

// qemu-storage-daemon 7.2 (cache.direct on or off) offers SIZE_MAX and SEG_MAX and reports
// size_max 0: a disk with no stated segment limit, not a broken one.
TEST(BlkDriverConfig, SizeMaxZeroStatesNoLimit) {
  auto i = BlkDriver::parse_config(config(32768, 512, 1, 126, 0), kAll);
  ASSERT_TRUE(i) << i.error().message();
  EXPECT_EQ(i->size_max, 0u);
  EXPECT_EQ(i->seg_max, 126u);
  EXPECT_EQ(i->capacity, 32768u);
}

TEST(BlkDriverConfig, SizeMaxZeroWithoutTheFeatureIsNotRead) {
  auto i = BlkDriver::parse_config(config(8, 512, 1, 126, 0), kAll & ~bit(bf::size_max));
  ASSERT_TRUE(i) << i.error().message();
  EXPECT_EQ(i->size_max, 0u);
}

TEST(BlkDriverConfig, SizeMaxBelowASectorIsRefused) {
  auto i = BlkDriver::parse_config(config(8, 512, 1, 126, 511), kAll);
  ASSERT_FALSE(i);
  EXPECT_NE(i.error().detail.find("size_max 511"), std::string::npos) << i.error().detail;
}

TEST(BlkDriverConfig, ZeroCapacityIsRefused) {
  EXPECT_FALSE(BlkDriver::parse_config(config(0), kAll));
}

TEST(BlkDriverConfig, CapacityBeyondAddressableBytesIsRefused) {
  EXPECT_FALSE(BlkDriver::parse_config(config(~std::uint64_t{0}), kAll));
  EXPECT_TRUE(BlkDriver::parse_config(config(std::uint64_t{1} << 54), kAll));
}

TEST(BlkDriverConfig, BlkSizeNotAPowerOfTwoOrOutOfRangeIsRefused) {
  for (std::uint32_t b : {0u, 256u, 511u, 1000u, 3072u, 131072u}) {
    EXPECT_FALSE(BlkDriver::parse_config(config(8, b), kAll)) << b;
  }
  for (std::uint32_t b : {512u, 1024u, 4096u, 65536u}) {
    EXPECT_TRUE(BlkDriver::parse_config(config(8, b), kAll)) << b;
  }
}

TEST(BlkDriverConfig, ZeroQueuesWithMqIsRefused) {
  EXPECT_FALSE(BlkDriver::parse_config(config(8, 512, 0), kAll));
}

TEST(BlkDriverConfig, ShortConfigIsRefused) {
  auto c = config(8);
  c.pop_back();
  EXPECT_FALSE(BlkDriver::parse_config(c, kAll));
}

TEST(BlkDriverOptionsTest, RingIsSizedForThreeDescriptorsPerRequest) {
  auto o = opts();
  o.depth = 32;
  auto s = std::move(o).session_options();
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->queue_size, 128u);
  EXPECT_EQ(s->rings, 1u);
  // 4 KiB of data plus header and status round up to two pages per slot; 32 slots a ring.
  EXPECT_EQ(BlkDriver::slot_bytes(4096), 8192u);
  EXPECT_EQ(s->ring_area_bytes, 32u * 8192);
  EXPECT_EQ(s->features, kBlkFeatures);
  EXPECT_EQ(s->drivable, kBlkDrivableFeatures);

  auto two = opts();
  two.num_queues = 2;
  auto s2 = std::move(two).session_options();
  ASSERT_TRUE(s2) << s2.error().message();
  EXPECT_EQ(s2->rings, 2u);
  EXPECT_EQ(s2->queues.count, 2u);
  EXPECT_EQ(s2->features, kBlkFeatures | virtio::bit(bf::mq));

  auto small = opts();
  small.depth = 1;
  EXPECT_EQ(std::move(small).session_options()->queue_size, 64u);  // the floor
}

TEST(BlkDriverOptionsTest, BadDepthDataOrRingAreRefused) {
  auto o = opts();
  o.depth = 0;
  EXPECT_FALSE(std::move(o).session_options());
  o = opts();
  o.depth = BlkDriver::kMaxDepth + 1;
  EXPECT_FALSE(std::move(o).session_options());
  o = opts();
  o.max_data = 1000;
  EXPECT_FALSE(std::move(o).session_options());
  o = opts();
  o.max_data = 0;
  EXPECT_FALSE(std::move(o).session_options());
  o = opts();
  o.max_data = BlkDriver::kMaxData + 512;
  EXPECT_FALSE(std::move(o).session_options());
  o = opts();
  o.depth = 64;
  o.queue_size = 128;  // holds 42 requests
  EXPECT_FALSE(std::move(o).session_options());
  o = opts();
  o.num_queues = 0;
  EXPECT_FALSE(std::move(o).session_options());
  o = opts();
  o.num_queues = BlkDriver::kMaxQueues + 1;
  EXPECT_FALSE(std::move(o).session_options());
  o = opts();
  o.depth = 20000;  // needs 60000 descriptors
  EXPECT_FALSE(std::move(o).session_options());
}

TEST(BlkDriverOptionsTest, ConnectFailsCleanlyWithoutABackEnd) {
  auto f = BlkDriver::connect(opts());
  ASSERT_FALSE(f);
  EXPECT_NE(f.error().message().find("/nonexistent/x.sock"), std::string::npos)
      << f.error().message();
}

}  // namespace
}  // namespace vhostkit::driver

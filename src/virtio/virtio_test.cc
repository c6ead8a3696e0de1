#include <gtest/gtest.h>

#include "vhostkit/error.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/net.h"
#include "vhostkit/virtio/ring.h"

namespace vhostkit::virtio {
namespace {

TEST(VirtioRing, QueueSizeMustBePowerOfTwoUpTo32768) {
  EXPECT_TRUE(is_valid_queue_size(1));
  EXPECT_TRUE(is_valid_queue_size(256));
  EXPECT_TRUE(is_valid_queue_size(32768));
  EXPECT_FALSE(is_valid_queue_size(0));
  EXPECT_FALSE(is_valid_queue_size(3));
  EXPECT_FALSE(is_valid_queue_size(65536));
}

TEST(VirtioRing, NeedEventMatchesSpecExamples) {
  // The driver asked to be told once idx passes 5.
  EXPECT_TRUE(vring_need_event(5, 6, 5));
  EXPECT_TRUE(vring_need_event(5, 10, 0));
  EXPECT_FALSE(vring_need_event(5, 5, 0));
  EXPECT_FALSE(vring_need_event(5, 12, 6));
  // Wrap-around of the 16-bit index.
  EXPECT_TRUE(vring_need_event(0xffff, 2, 0xfffe));
  EXPECT_FALSE(vring_need_event(3, 2, 0xfffe));
}

TEST(VirtioRing, PartSizesIncludeTheEventWord) {
  EXPECT_EQ(desc_table_bytes(256), 4096u);
  EXPECT_EQ(avail_ring_bytes(256), 6u + 512u);
  EXPECT_EQ(used_ring_bytes(256), 6u + 2048u);
}

TEST(VirtioNet, HeaderSizeDependsOnFeatures) {
  EXPECT_EQ(net_hdr_size(false, false), 10u);
  EXPECT_EQ(net_hdr_size(true, false), 12u);
  EXPECT_EQ(net_hdr_size(false, true), 12u);
}

TEST(Error, MessageNamesCodeDetailAndErrno) {
  Error e{Errc::system, ENOENT, "open /nope"};
  EXPECT_EQ(e.message(), "system error: open /nope (No such file or directory)");
}

}  // namespace
}  // namespace vhostkit::virtio

// Live migration as QEMU runs it against a vhost-user back-end, with our front-end standing in
// for QEMU and frames moving all the while (issue #15):
//   - the source: SET_LOG_BASE, then SET_FEATURES with VHOST_F_LOG_ALL and SET_VRING_ADDR with
//     VHOST_VRING_F_LOG on the running rings (vhost_migration_log, vhost_dev_set_log); every
//     page the device writes from then on must be marked in the log, which the test checks
//     against a shadow of the writes: each frame received, where it landed, and the used rings;
//   - the switch-over: GET_VRING_BASE on every ring of the source (the VM stopped), then a
//     destination back-end gets the same guest memory, the same rings and the source's bases
//     (SET_MEM_TABLE, SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE), and the traffic goes on there:
//     no frame answered twice, none corrupted, every frame sent accounted for.
// Both on the split ring and on the packed ring, whose base carries the wrap counters; then
// back and forth between the two back-ends until every packed ring stopped with each wrap
// counter at 0 and at 1 (a back-end that lost them reads the next descriptors as not available).
#include <array>
#include <mutex>
#include <vector>

#include "live_rig.h"
#include "testing/dirty_log.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/ring.h"

namespace vhostkit::live {
namespace {

constexpr std::uint64_t kLogShmfd = std::uint64_t{1} << vhost_user::protocol_feature::log_shmfd;

// Every frame a driver received, where it was in guest memory (frames that did not fit one
// receive buffer are gathered into scratch memory by the driver: those have no place and count
// only as `gathered`).
struct Shadow {
  struct Write {
    std::uint32_t seq;
    std::uint64_t gpa;
    std::uint64_t len;
  };
  std::mutex mu;
  std::vector<Write> writes;
  std::uint64_t gathered = 0;

  PairDriver::Observer observer(std::span<const std::uint8_t> mem) {
    return [this, mem](std::uint32_t seq, std::span<const std::uint8_t> f) {
      std::lock_guard lk(mu);
      if (f.data() < mem.data() || f.data() + f.size() > mem.data() + mem.size()) {
        ++gathered;
        return;
      }
      writes.push_back({seq, static_cast<std::uint64_t>(f.data() - mem.data()), f.size()});
    };
  }
};

using vhost_user::RingLayout;

class LiveMigration : public ::testing::TestWithParam<RingLayout> {};

TEST_P(LiveMigration, DirtyLogCoversEveryPageTheDeviceWritesUnderTraffic) {
  NetBackend be(1, "miglog");
  ASSERT_TRUE(be.listening);
  auto s = be.connect(1, kLogShmfd, GetParam());
  ASSERT_TRUE(s) << s.error().message();
  NetDriver& fe = **s;
  vhost_user::FrontendSession& fs = fe.session();
  ASSERT_EQ(fs.layout(), GetParam());
  ASSERT_TRUE(fs.has_protocol(vhost_user::protocol_feature::log_shmfd));
  ASSERT_TRUE(virtio::has(fs.offered_features(), virtio::feature::log_all))
      << "the back-end does not offer VHOST_F_LOG_ALL";
  Control ctl(fs.socket_fd());

  Shadow shadow;
  PairDriver drv(fe, be.net, 0, /*exact=*/true, shadow.observer(fs.memory()));
  ASSERT_TRUE(drv.wait_progress(200)) << drv.describe();

  // A bitmap for the whole of guest memory (one bit per 4 KiB page).
  testing::SharedLog log((fs.memory().size() / testing::SharedLog::kPage + 7) / 8);
  ASSERT_TRUE(log.ok());
  ASSERT_TRUE(ctl.request(vhost_user::SetLogBase{.mmap_size = log.size(), .fd = log.fd()}));
  // Given, but not yet asked for: nothing may be marked.
  ASSERT_TRUE(drv.wait_progress(100)) << drv.describe();
  for (std::uint64_t gpa = 0; gpa < fs.memory().size(); gpa += testing::SharedLog::kPage) {
    ASSERT_FALSE(log.dirty(gpa)) << "page at 0x" << std::hex << gpa << " marked before LOG_ALL";
  }

  // LOG_ALL on, the rings running; then the used rings' log flag, as QEMU sends it.
  ASSERT_TRUE(ctl.request(
      vhost_user::SetFeatures{.value = fs.features() | virtio::bit(virtio::feature::log_all)}));
  // Every frame the driver sends from here on is written into a receive buffer after LOG_ALL
  // took effect (the loopback copies tx into rx): its pages must be marked.
  const std::uint64_t first_logged = drv.sent();
  for (std::uint16_t i = 0; i < fs.num_rings(); ++i) {
    ASSERT_TRUE(ctl.request(vring_addr(fs, i, /*log=*/true))) << "ring " << i;
  }
  // Up to a window of frames in flight at LOG_ALL come back too but are not checked.
  ASSERT_TRUE(drv.wait_progress(2000 + PairDriver::kWindow)) << drv.describe();
  // The used rings are written for every frame after the flag: marked once traffic went on.
  // Packed: the used descriptors overwrite the descriptor ring, laps of it by now, and the
  // device event area is the device's (its log address, as QEMU gives it).
  for (std::uint16_t i = 0; i < fs.num_rings(); ++i) {
    const vhost_user::FrontendRing& r = fs.ring(i);
    if (r.packed) {
      EXPECT_TRUE(log.all_dirty(r.pvq.desc_gpa(), r.pvq.size() * sizeof(virtio::PackedDesc)))
          << "descriptor ring " << i << " (the used descriptors) not all marked";
      EXPECT_TRUE(log.all_dirty(r.pvq.device_event_gpa(), sizeof(virtio::PackedEventSuppress)))
          << "device event area " << i << " not marked";
    } else {
      EXPECT_TRUE(log.all_dirty(r.vq.used_gpa(), 4))
          << "used ring " << i << " (its index) not marked";
    }
  }
  ASSERT_TRUE(drv.stop()) << drv.describe();
  ASSERT_EQ(drv.errors(), 0u) << drv.describe();

  const std::size_t hdr = sizeof(virtio::VirtioNetHdrMrg);
  std::uint64_t checked = 0;
  {
    std::lock_guard lk(shadow.mu);
    for (const Shadow::Write& w : shadow.writes) {
      if (w.seq < first_logged) continue;
      ++checked;
      // The header sits right before the frame in the same buffer; the device wrote both.
      ASSERT_TRUE(log.all_dirty(w.gpa - hdr, w.len + hdr))
          << "frame seq " << w.seq << " at 0x" << std::hex << w.gpa << " (+" << std::dec << w.len
          << ") written after LOG_ALL but not marked";
    }
    EXPECT_EQ(shadow.gathered, 0u) << "frames that did not fit one buffer went unchecked";
  }
  EXPECT_GE(checked, 2000u) << "too few frames written under LOG_ALL to say anything";

  // LOG_ALL off again: the log is dropped from the table; later writes mark nothing.
  ASSERT_TRUE(ctl.request(vhost_user::SetFeatures{.value = fs.features()}));
  log.clear();
  PairDriver again(fe, be.net, 0, /*exact=*/false);
  ASSERT_TRUE(again.wait_progress(200)) << again.describe();
  ASSERT_TRUE(again.stop()) << again.describe();
  for (std::uint64_t gpa = 0; gpa < fs.memory().size(); gpa += testing::SharedLog::kPage) {
    ASSERT_FALSE(log.dirty(gpa)) << "page at 0x" << std::hex << gpa << " marked after LOG_ALL off";
  }
}

TEST_P(LiveMigration, DestinationResumesFromTheSourceBasesWithTheSameRings) {
  NetBackend src(1, "migsrc");
  NetBackend dst(1, "migdst");
  ASSERT_TRUE(src.listening);
  ASSERT_TRUE(dst.listening);
  auto s = src.connect(1, 0, GetParam());
  ASSERT_TRUE(s) << s.error().message();
  NetDriver& fe = **s;
  vhost_user::FrontendSession& fs = fe.session();
  ASSERT_EQ(fs.layout(), GetParam());
  Control src_ctl(fs.socket_fd());

  // Drops are allowed: between the receiveq's stop and the transmitq's the loopback may find no
  // receive buffer (counted by the source's device). Every frame that arrives must be intact and
  // newer than the one before: none answered twice, by either back-end.
  PairDriver drv(fe, {&src.net, &dst.net}, 0, /*exact=*/false);
  ASSERT_TRUE(drv.wait_progress(300)) << drv.describe();

  // The VM stops: the source stops every ring (receiveq first, as QEMU does) and says where.
  std::vector<std::uint32_t> base(fs.num_rings());
  for (std::uint16_t i = 0; i < fs.num_rings(); ++i) {
    auto b = src_ctl.get_vring_base(i);
    ASSERT_TRUE(b) << "GET_VRING_BASE " << i << ": " << b.error().message();
    ASSERT_FALSE(src.device.queue(i).started()) << "source ring " << i << " still runs";
    base[i] = *b;
  }
  const std::uint64_t received_at_stop = drv.received();
  const std::uint64_t src_drops = src.net.stats(0).tx_drops;

  // The destination: the same memory, features, rings and bases.
  auto ch = vhost_user::connect_unix(dst.path);
  ASSERT_TRUE(ch) << ch.error().message();
  Control dst_ctl(std::move(*ch));
  // QEMU's order: SET_OWNER, the feature queries, SET_PROTOCOL_FEATURES (REPLY_ACK is not yet
  // negotiated: no acks until it is), then every request with NEED_REPLY.
  ASSERT_TRUE(dst_ctl.send(vhost_user::SetOwner{}));
  auto features = dst_ctl.query(vhost_user::Request::get_features);
  ASSERT_TRUE(features) << features.error().message();
  ASSERT_EQ(*features & fs.features(), fs.features()) << "the destination offers less";
  auto proto = dst_ctl.query(vhost_user::Request::get_protocol_features);
  ASSERT_TRUE(proto) << proto.error().message();
  ASSERT_EQ(*proto & fs.protocol_features(), fs.protocol_features());
  ASSERT_TRUE(dst_ctl.send(vhost_user::SetProtocolFeatures{.value = fs.protocol_features()}));
  ASSERT_TRUE(dst_ctl.request(vhost_user::SetFeatures{.value = fs.features()}));
  vhost_user::SetMemTable table;
  UniqueFd memfd = memfd_of(fs.memory());
  ASSERT_TRUE(memfd.valid()) << "the front-end's memfd was not found";
  table.regions.push_back(memory::RegionFd{
      .spec = {.guest_phys_addr = 0,
               .size = fs.memory().size(),
               .userspace_addr = reinterpret_cast<std::uint64_t>(fs.memory().data()),
               .mmap_offset = 0},
      .fd = std::move(memfd)});
  ASSERT_TRUE(dst_ctl.request(std::move(table)));
  for (std::uint16_t i = 0; i < fs.num_rings(); ++i) {
    auto r = dst_ctl.restart_ring(fs, i, base[i]);
    ASSERT_TRUE(r) << "ring " << i << ": " << r.error().message();
    ASSERT_TRUE(eventually([&] { return dst.device.queue(i).started(); })) << "ring " << i;
  }

  // The traffic goes on through the destination, from exactly where the source stopped.
  ASSERT_TRUE(drv.wait_progress(2000)) << drv.describe();
  EXPECT_EQ(src.net.stats(0).tx_drops, src_drops) << "the stopped source still moved frames";
  EXPECT_GT(drv.received(), received_at_stop + 2000);

  // And back and forth between the two, as a VM migrated again: each stop hands its bases to
  // the other back-end. A packed base carries the wrap counters (bit 15: avail, bit 31: used),
  // which flip each lap: a back-end that dropped or fixed them would still pass at a stop where
  // they happen to be what it assumes, so migrate until every ring stopped with each counter
  // at 0 and at 1.
  std::array<NetBackend*, 2> be = {&src, &dst};
  std::array<Control*, 2> ctl = {&src_ctl, &dst_ctl};
  const bool packed = fs.layout() == RingLayout::packed;
  std::vector<std::array<bool, 4>> seen(fs.num_rings());  // avail 0, avail 1, used 0, used 1
  const auto wraps_seen = [&](const std::vector<std::uint32_t>& b) {
    bool all = true;
    for (std::uint16_t i = 0; i < fs.num_rings(); ++i) {
      seen[i][(b[i] >> 15) & 1u] = true;
      seen[i][2 + (b[i] >> 31)] = true;
      all = all && seen[i][0] && seen[i][1] && seen[i][2] && seen[i][3];
    }
    return all;
  };
  bool all_seen = wraps_seen(base);
  int hops = 1;
  for (std::size_t cur = 1; packed ? !all_seen : hops < 3; cur ^= 1, ++hops) {
    SCOPED_TRACE(fmt::format("hop {} to back-end {}", hops + 1, cur ^ 1));
    ASSERT_LT(hops, 40) << "the wrap counters never stopped at both values";
    // A lap and a bit more each hop (a random one: the stop lands wherever the traffic is).
    const std::uint64_t target = drv.received() + fe.queue_size() + 37u * hops;
    ASSERT_TRUE(eventually([&] { return drv.received() > target || drv.errors() != 0; }))
        << drv.describe();
    for (std::uint16_t i = 0; i < fs.num_rings(); ++i) {
      auto b = ctl[cur]->get_vring_base(i);
      ASSERT_TRUE(b) << "GET_VRING_BASE " << i << ": " << b.error().message();
      base[i] = *b;
    }
    all_seen = wraps_seen(base);
    for (std::uint16_t i = 0; i < fs.num_rings(); ++i) {
      auto r = ctl[cur ^ 1]->restart_ring(fs, i, base[i]);
      ASSERT_TRUE(r) << "ring " << i << ": " << r.error().message();
      ASSERT_TRUE(eventually([&] { return be[cur ^ 1]->device.queue(i).started(); }))
          << "ring " << i;
    }
  }
  ASSERT_TRUE(drv.wait_progress(1000)) << drv.describe();

  // Stop and account: every frame sent came back or was dropped by a back-end while its rings
  // stopped one after the other (receiveq first).
  drv.stop();
  const std::uint64_t lost = drv.sent() - drv.received();
  EXPECT_EQ(drv.errors(), 0u) << drv.describe();
  EXPECT_LE(lost, src.net.stats(0).tx_drops + dst.net.stats(0).tx_drops) << drv.describe();
}

INSTANTIATE_TEST_SUITE_P(Rings, LiveMigration,
                         ::testing::Values(RingLayout::split, RingLayout::packed),
                         [](const ::testing::TestParamInfo<RingLayout>& p) {
                           return std::string(vhost_user::to_string(p.param));
                         });

}  // namespace
}  // namespace vhostkit::live

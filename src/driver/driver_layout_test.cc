// NetDriver and BlkDriver on both ring layouts, with and without IN_ORDER, against a device
// played in this process. The fake back-end (testing/fake_backend.h) does the protocol and
// offers the packed ring and IN_ORDER; the device is virtq's own DeviceQueue or
// PackedDeviceQueue attached to the driver's rings in the shared memory, so every frame and
// every block crosses a real ring of the negotiated layout, and with IN_ORDER the device folds
// runs of chains into one used entry the way 2.7.8 and 2.8.21 allow.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "testing/fake_backend.h"
#include "vhostkit/driver/blk_driver.h"
#include "vhostkit/driver/net_driver.h"
#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/virtq/iov.h"
#include "vhostkit/virtq/packed_queue.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::driver {
namespace {

using namespace std::chrono_literals;
using vhost_user::RingLayout;
using vhostkit::testing::FakeBackend;

constexpr std::uint64_t pbit(unsigned n) { return std::uint64_t{1} << n; }
constexpr std::uint64_t kRingBits =
    virtio::bit(virtio::feature::ring_packed) | virtio::bit(virtio::feature::in_order);
constexpr std::uint64_t kOfferedProtocol = pbit(vhost_user::protocol_feature::mq) |
                                           pbit(vhost_user::protocol_feature::reply_ack) |
                                           pbit(vhost_user::protocol_feature::config);

struct Param {
  RingLayout ring;
  bool in_order;
};
void PrintTo(const Param& p, std::ostream* os) {
  *os << vhost_user::to_string(p.ring) << (p.in_order ? " in order" : "");
}
std::string param_name(const ::testing::TestParamInfo<Param>& i) {
  return std::string(vhost_user::to_string(i.param.ring)) + (i.param.in_order ? "_in_order" : "");
}
const auto kParams =
    ::testing::Values(Param{RingLayout::split, false}, Param{RingLayout::split, true},
                      Param{RingLayout::packed, false}, Param{RingLayout::packed, true});

// One device queue per ring of a connected session, of the session's layout, over a
// GuestMemory that maps the session's memory at GPA 0 as the back-end would.
class Device {
 public:
  explicit Device(vhost_user::FrontendSession& s) {
    const auto m = s.memory();
    auto r = mem_.add_local_region(
        memory::RegionSpec{0, m.size(), reinterpret_cast<std::uint64_t>(m.data()), 0}, m.data());
    EXPECT_TRUE(r) << r.error().message();
    for (std::uint16_t i = 0; i < s.num_rings(); ++i) {
      auto& fr = s.ring(i);
      auto q = std::make_unique<Queue>();
      q->packed = fr.packed;
      if (fr.packed) {
        q->pq.attach(&mem_,
                     virtq::PackedRing{fr.pvq.desc(), fr.pvq.driver_event(), fr.pvq.device_event(),
                                       s.queue_size()},
                     s.features());
      } else {
        q->sq.attach(&mem_,
                     virtq::SplitRing{fr.vq.desc(), fr.vq.avail(), fr.vq.used(), s.queue_size()},
                     s.features(), 0);
      }
      queues_.push_back(std::move(q));
    }
  }
  // Runs f on ring i's device queue (either type).
  template <typename F>
  decltype(auto) on(std::uint16_t i, F&& f) {
    Queue& q = *queues_[i];
    return q.packed ? f(q.pq) : f(q.sq);
  }

 private:
  struct Queue {
    bool packed = false;
    virtq::DeviceQueue sq;
    virtq::PackedDeviceQueue pq;
  };
  memory::GuestMemory mem_;
  std::vector<std::unique_ptr<Queue>> queues_;
};

// ---- net ----------------------------------------------------------------------------------

// A loopback device on pair 0: each frame sent comes back on the receiveq, spread over as many
// receive buffers as it takes with at most `chunk` bytes in each (mergeable buffers at any frame
// size). inject() puts a frame of any length on the receiveq directly.
class Loopback {
 public:
  Loopback(NetDriver& d, std::size_t chunk)
      : dev_(d.session()), hdr_(d.net_hdr_len()), chunk_(chunk) {}

  // Moves frames until the transmitq is empty or the receiveq is out of buffers.
  void step() {
    for (;;) {
      if (!have_frame_ && !take_tx()) break;
      if (!deliver(frame_)) break;
      have_frame_ = false;
    }
    publish();
  }
  bool inject(const std::vector<std::uint8_t>& frame) {
    const bool ok = deliver(frame);
    publish();
    return ok;
  }
  std::uint64_t errors() {
    std::uint64_t n = 0;
    for (std::uint16_t i : {0, 1}) {
      dev_.on(i, [&](auto& q) {
        for (auto e : q.errors()) n += e;
        n += q.broken() ? 1 : 0;
      });
    }
    return n;
  }

 private:
  bool take_tx() {
    return dev_.on(NetDriver::tx_index(0), [&](auto& q) {
      if (q.pending() == 0) return false;
      std::array<iovec, 4> segs;
      auto c = q.pop(segs);
      if (!c || c->readable_len < hdr_) {
        ADD_FAILURE() << "a bad tx chain";
        return false;
      }
      frame_.resize(c->readable_len - hdr_);
      virtq::iov_read(c->readable, hdr_, frame_.data(), frame_.size());
      q.push_used(c->head, 0);
      have_frame_ = true;
      return true;
    });
  }

  // Gathers enough receive buffers, then writes header and frame across them.
  bool deliver(const std::vector<std::uint8_t>& frame) {
    const std::size_t total = hdr_ + frame.size();
    const std::size_t need = (total + chunk_ - 1) / chunk_;
    const bool enough = dev_.on(NetDriver::rx_index(0), [&](auto& q) {
      while (rx_.size() < need) {
        if (q.pending() == 0) return false;
        std::array<iovec, 2> seg;
        auto c = q.pop(seg);
        if (!c || c->writable.size() != 1) {
          ADD_FAILURE() << "a bad rx chain";
          return false;
        }
        rx_.emplace_back(c->head, c->writable[0]);
      }
      return true;
    });
    if (!enough) return false;
    std::vector<std::uint8_t> stream(total, 0);
    const auto nbuf = static_cast<std::uint16_t>(need);
    std::memcpy(stream.data() + 10, &nbuf, 2);  // num_buffers
    std::copy(frame.begin(), frame.end(), stream.begin() + static_cast<std::ptrdiff_t>(hdr_));
    dev_.on(NetDriver::rx_index(0), [&](auto& q) {
      std::size_t off = 0;
      for (std::size_t k = 0; k < need; ++k) {
        auto [head, v] = rx_[k];
        const std::size_t n = std::min({chunk_, total - off, v.iov_len});
        std::memcpy(v.iov_base, stream.data() + off, n);
        q.push_used(head, static_cast<std::uint32_t>(n));
        off += n;
      }
      EXPECT_EQ(off, total);
    });
    rx_.erase(rx_.begin(), rx_.begin() + static_cast<std::ptrdiff_t>(need));
    return true;
  }

  void publish() {
    for (std::uint16_t i : {0, 1}) dev_.on(i, [](auto& q) { q.publish_used(); });
  }

  Device dev_;
  std::size_t hdr_;
  std::size_t chunk_;
  std::vector<std::uint8_t> frame_;
  bool have_frame_ = false;
  std::vector<std::pair<std::uint16_t, iovec>> rx_;  // receive buffers popped, not yet used
};

std::vector<std::uint8_t> make_frame(std::uint32_t seq, std::size_t len) {
  std::vector<std::uint8_t> f(len);
  for (std::size_t i = 0; i < len; ++i) f[i] = static_cast<std::uint8_t>(seq * 131 + i * 7);
  std::memcpy(f.data(), &seq, sizeof seq);
  return f;
}

class NetDriverLayoutTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    auto pair = vhost_user::socketpair();
    ASSERT_TRUE(pair);
    FakeBackend::Script script{
        .features = kNetFeatures | kRingBits | virtio::bit(virtio::feature::protocol_features),
        .protocol_features = kOfferedProtocol};
    fake_ = std::make_unique<FakeBackend>(std::move(pair->second), std::move(script));
    NetDriverOptions o;
    o.channel = std::move(pair->first);
    o.memory_size = 0;
    o.queue_size = 64;
    o.timeout = 1000ms;
    o.ring = GetParam().ring;
    o.in_order = GetParam().in_order;
    auto d = NetDriver::connect(std::move(o));
    ASSERT_TRUE(d) << d.error().message();
    drv_ = std::move(*d);
  }

  // Receives everything waiting, appending the frames to `got`.
  void receive(std::vector<std::vector<std::uint8_t>>& got) {
    while (drv_->rx_burst(0, 32, [&](std::span<const std::uint8_t> f) {
      got.emplace_back(f.begin(), f.end());
    }) != 0) {
    }
  }

  std::unique_ptr<FakeBackend> fake_;
  std::unique_ptr<NetDriver> drv_;
};

TEST_P(NetDriverLayoutTest, NegotiatesWhatWasAskedFor) {
  EXPECT_EQ(drv_->layout(), GetParam().ring);
  EXPECT_EQ(drv_->in_order(), GetParam().in_order);
  EXPECT_EQ(virtio::has(fake_->set_features(), virtio::feature::ring_packed),
            GetParam().ring == RingLayout::packed);
  EXPECT_EQ(virtio::has(fake_->set_features(), virtio::feature::in_order), GetParam().in_order);
  for (std::uint16_t i = 0; i < 2; ++i)
    EXPECT_EQ(drv_->session().ring(i).packed, GetParam().ring == RingLayout::packed);
  // Every receive buffer is on the ring before the device starts.
  EXPECT_EQ(drv_->session().ring(NetDriver::rx_index(0)).free_count(), 0);
  EXPECT_EQ(drv_->session().ring(NetDriver::tx_index(0)).free_count(), 64);
}

// Frames of every size from 60 to a full buffer go round, many times round both rings; each
// comes back whole and in order, some spread over up to four receive buffers.
TEST_P(NetDriverLayoutTest, FramesRoundTripEveryByte) {
  Loopback dev(*drv_, 700);
  std::vector<std::vector<std::uint8_t>> sent, got;
  std::uint32_t seq = 0;
  for (int round = 0; round < 60; ++round) {
    const std::size_t burst = 1 + (round * 7) % 40;
    const std::size_t n =
        drv_->tx_burst_fill(0, burst, [&](std::size_t, std::span<std::uint8_t> room) {
          const std::size_t len = 60 + (seq * 397) % (room.size() - 59);
          auto f = make_frame(seq++, len);
          std::memcpy(room.data(), f.data(), len);
          sent.push_back(std::move(f));
          return len;
        });
    EXPECT_GT(n, 0u) << "round " << round;
    for (int k = 0; k < 2; ++k) {
      dev.step();
      receive(got);
    }
  }
  // What the device holds back for want of receive buffers comes out once they return.
  for (int i = 0; i < 10 && got.size() < sent.size(); ++i) {
    dev.step();
    receive(got);
  }
  ASSERT_EQ(got.size(), sent.size());
  for (std::size_t i = 0; i < sent.size(); ++i) ASSERT_EQ(got[i], sent[i]) << "frame " << i;
  EXPECT_EQ(dev.errors(), 0u);
  const auto& tx = drv_->stats(NetDriver::tx_index(0));
  const auto& rx = drv_->stats(NetDriver::rx_index(0));
  EXPECT_EQ(tx.frames, sent.size());
  EXPECT_EQ(rx.bad, 0u);
  EXPECT_EQ(drv_->session().ring(0).bad_used() + drv_->session().ring(1).bad_used(), 0u);
  // Every transmit chain comes back (one used entry for a run of them with IN_ORDER).
  drv_->reclaim_tx(0);
  EXPECT_EQ(tx.completed, sent.size());
  EXPECT_EQ(drv_->tx_ring(0).free_top, 64);
}

// Frames longer than a buffer fill whole buffers and end in a partial one: with IN_ORDER the
// device answers each such run with one used entry and the driver takes the earlier buffers as
// written completely.
TEST_P(NetDriverLayoutTest, LargeFramesOverFullBuffers) {
  Loopback dev(*drv_, 2048);
  std::vector<std::vector<std::uint8_t>> sent, got;
  for (std::uint32_t i = 0; i < 200; ++i) {
    sent.push_back(make_frame(i, 100 + (i * 1999) % 9000));
    if (!dev.inject(sent.back())) {
      receive(got);  // buffers back on the ring
      ASSERT_TRUE(dev.inject(sent.back())) << "frame " << i;
    }
  }
  receive(got);
  ASSERT_EQ(got.size(), sent.size());
  for (std::size_t i = 0; i < sent.size(); ++i) ASSERT_EQ(got[i], sent[i]) << "frame " << i;
  EXPECT_EQ(drv_->stats(NetDriver::rx_index(0)).bad, 0u);
  EXPECT_EQ(dev.errors(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Layouts, NetDriverLayoutTest, kParams, param_name);

// A back-end that offers neither gets the split ring, whatever was asked.
TEST(NetDriverLayout, FallsBackToSplitWhenNotOffered) {
  auto pair = vhost_user::socketpair();
  ASSERT_TRUE(pair);
  FakeBackend fake(std::move(pair->second),
                   {.features = kNetFeatures | virtio::bit(virtio::feature::protocol_features),
                    .protocol_features = kOfferedProtocol});
  NetDriverOptions o;
  o.channel = std::move(pair->first);
  o.memory_size = 0;
  o.queue_size = 64;
  o.ring = RingLayout::packed;
  o.in_order = true;
  auto d = NetDriver::connect(std::move(o));
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ((*d)->layout(), RingLayout::split);
  EXPECT_FALSE((*d)->in_order());
  EXPECT_EQ(fake.set_features() & kRingBits, 0u);
}

// A packed used descriptor naming a buffer id that is not in flight: the driver cannot tell
// where the chain ends, so it counts it, reclaims nothing more from that ring, and lives on.
TEST(NetDriverLayout, PackedUsedWithUnknownIdBreaksOnlyThatRing) {
  auto pair = vhost_user::socketpair();
  ASSERT_TRUE(pair);
  FakeBackend fake(
      std::move(pair->second),
      {.features = kNetFeatures | kRingBits | virtio::bit(virtio::feature::protocol_features),
       .protocol_features = kOfferedProtocol});
  NetDriverOptions o;
  o.channel = std::move(pair->first);
  o.memory_size = 0;
  o.queue_size = 64;
  o.ring = RingLayout::packed;
  auto d = NetDriver::connect(std::move(o));
  ASSERT_TRUE(d) << d.error().message();
  NetDriver& s = **d;
  auto& pvq = s.session().ring(NetDriver::rx_index(0)).pvq;
  virtio::PackedDesc& slot = pvq.desc()[0];
  slot.id = 9999;
  slot.len = 100;
  // Used in the first lap: AVAIL and USED both set, released after the fields above.
  std::atomic_ref<std::uint16_t>(slot.flags)
      .store(virtio::kDescFAvail | virtio::kDescFUsed | virtio::kDescFWrite,
             std::memory_order_release);
  EXPECT_EQ(s.rx_burst(0, 32, [](auto) { FAIL() << "delivered"; }), 0u);
  EXPECT_EQ(pvq.bad_used(), 1u);
  EXPECT_TRUE(pvq.broken());
  EXPECT_EQ(s.rx_burst(0, 32, [](auto) { FAIL() << "delivered"; }), 0u);
  // The transmit ring is another ring: it still takes frames.
  std::vector<std::uint8_t> frame(100, 0x5a);
  std::vector<std::span<const std::uint8_t>> frames(4, frame);
  EXPECT_EQ(s.tx_burst(0, frames), 4u);
}

// ---- blk ----------------------------------------------------------------------------------

constexpr std::uint64_t kSectors = 4096;

// A RAM disk on request queue 0. Without IN_ORDER it answers each batch in reverse (any order
// is allowed); with it, in the order popped.
class RamDisk {
 public:
  RamDisk(BlkDriver& d, bool in_order)
      : dev_(d.session()), in_order_(in_order), disk_(kSectors * 512, 0) {}

  std::size_t step() {
    return dev_.on(0, [&](auto& q) {
      struct Done {
        std::uint16_t head;
        std::uint32_t len;
      };
      std::vector<Done> done;
      while (q.pending() != 0) {
        std::array<iovec, 8> segs;
        auto c = q.pop(segs);
        if (!c) {
          ADD_FAILURE() << "a bad request chain";
          break;
        }
        done.push_back({c->head, serve(*c)});
      }
      if (!in_order_) std::reverse(done.begin(), done.end());
      for (const Done& x : done) q.push_used(x.head, x.len);
      q.publish_used();
      return done.size();
    });
  }

 private:
  // Returns the bytes written into the chain (data read, then the status byte).
  std::uint32_t serve(const virtq::Chain& c) {
    virtio::VirtioBlkOutHdr h{};
    EXPECT_EQ(virtq::iov_read(c.readable, 0, &h, sizeof h), sizeof h);
    std::uint8_t status = virtio::kBlkSOk;
    std::uint32_t written = 0;
    const std::size_t data_in = c.writable_len - 1;
    const std::size_t data_out = c.readable_len - sizeof h;
    const std::size_t len = h.type == virtio::blk_type::in ? data_in : data_out;
    if (h.sector * 512 + len > disk_.size()) {
      status = virtio::kBlkSIoErr;
    } else if (h.type == virtio::blk_type::in) {
      virtq::iov_write(c.writable, 0, disk_.data() + h.sector * 512, len);
      written = static_cast<std::uint32_t>(len);
    } else if (h.type == virtio::blk_type::out) {
      virtq::iov_read(c.readable, sizeof h, disk_.data() + h.sector * 512, len);
    } else if (h.type != virtio::blk_type::flush) {
      status = virtio::kBlkSUnsupp;
    }
    virtq::iov_write(c.writable, c.writable_len - 1, &status, 1);
    return written + 1;
  }

  Device dev_;
  bool in_order_;
  std::vector<std::uint8_t> disk_;
};

class BlkDriverLayoutTest : public ::testing::TestWithParam<Param> {};

TEST_P(BlkDriverLayoutTest, WritesReadBackAcrossManyLaps) {
  auto pair = vhost_user::socketpair();
  ASSERT_TRUE(pair);
  virtio::VirtioBlkConfig cfg{};
  cfg.capacity = kSectors;
  cfg.blk_size = 512;
  std::vector<std::uint8_t> raw(sizeof cfg);
  std::memcpy(raw.data(), &cfg, sizeof cfg);
  FakeBackend fake(
      std::move(pair->second),
      {.features = kBlkFeatures | kRingBits | virtio::bit(virtio::feature::protocol_features),
       .protocol_features = kOfferedProtocol,
       .config = raw});
  BlkDriverOptions o;
  o.channel = std::move(pair->first);
  o.depth = 16;
  o.max_data = 2048;
  o.timeout = 1000ms;
  o.ring = GetParam().ring;
  o.in_order = GetParam().in_order;
  auto d = BlkDriver::connect(std::move(o));
  ASSERT_TRUE(d) << d.error().message();
  BlkDriver& blk = **d;
  EXPECT_EQ(blk.layout(), GetParam().ring);
  EXPECT_EQ(blk.in_order(), GetParam().in_order);
  RamDisk disk(blk, GetParam().in_order);

  auto pattern = [](std::uint64_t sector, int round, std::size_t i) {
    return static_cast<std::uint8_t>(sector * 31 + round * 17 + i);
  };
  // Runs one batch of `depth` requests of `type` and checks every status.
  auto batch = [&](std::uint32_t type, int round) {
    std::vector<std::pair<int, std::uint64_t>> slots;
    for (int k = 0; k < blk.depth(); ++k) {
      const int slot = blk.acquire(0);
      ASSERT_GE(slot, 0);
      const std::uint64_t sector =
          (static_cast<std::uint64_t>(round) * 64 + k * 4) % (kSectors - 4);
      const auto sl = static_cast<std::uint16_t>(slot);
      if (type == virtio::blk_type::out) {
        for (std::size_t i = 0; i < 2048; ++i) blk.data(0, sl)[i] = pattern(sector, round, i);
      } else {
        std::memset(blk.data(0, sl), 0, 2048);
      }
      ASSERT_TRUE(blk.submit(0, sl, type, sector, 2048));
      slots.emplace_back(slot, sector);
    }
    blk.publish(0);
    EXPECT_EQ(disk.step(), blk.depth());
    std::size_t ok = 0;
    blk.complete(0, [&](std::uint16_t slot, std::uint8_t status) {
      EXPECT_EQ(status, virtio::kBlkSOk);
      if (type == virtio::blk_type::in) {
        const auto it = std::find_if(slots.begin(), slots.end(),
                                     [&](const auto& p) { return p.first == slot; });
        ASSERT_NE(it, slots.end());
        for (std::size_t i = 0; i < 2048; ++i) {
          ASSERT_EQ(blk.data(0, slot)[i], pattern(it->second, round, i)) << "byte " << i;
        }
      }
      ++ok;
    });
    EXPECT_EQ(ok, blk.depth());
  };
  // 16 three-descriptor requests a batch on a ring of 64: the ring wraps every other batch.
  for (int round = 0; round < 12; ++round) {
    batch(virtio::blk_type::out, round);
    batch(virtio::blk_type::in, round);
  }
  const int slot = blk.acquire(0);
  ASSERT_GE(slot, 0);
  ASSERT_TRUE(blk.submit(0, static_cast<std::uint16_t>(slot), virtio::blk_type::flush, 0, 0));
  blk.publish(0);
  EXPECT_EQ(disk.step(), 1u);
  std::uint8_t flush_status = 0xee;
  EXPECT_EQ(blk.complete(0, [&](std::uint16_t, std::uint8_t st) { flush_status = st; }), 1u);
  EXPECT_EQ(flush_status, virtio::kBlkSOk);
  EXPECT_EQ(blk.inflight(0), 0);
  EXPECT_EQ(blk.session().ring(0).bad_used(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Layouts, BlkDriverLayoutTest, kParams, param_name);

}  // namespace
}  // namespace vhostkit::driver

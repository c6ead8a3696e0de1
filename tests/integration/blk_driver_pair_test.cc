// BlkDriver (and the bench's blk loop) against a real vhostkit-blk device in this process:
// BlkDevice on a temporary image, vhost::Device, BackendSession on its own thread, connected to
// the front-end through a socketpair. Data written through the front-end must be read back
// through it and found in the image file.
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include "blk_traffic.h"
#include "testing/blk_rig.h"
#include "vhostkit/blk/blk_device.h"
#include "vhostkit/driver/blk_driver.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/backend_session.h"

namespace vhostkit {
namespace {

using namespace std::chrono_literals;
using blk::testing::Bytes;
using blk::testing::TempImage;
using driver::BlkDriver;
using driver::BlkDriverOptions;
namespace vb = vhostkit::bench;

constexpr std::size_t kImageBytes = 8u << 20;  // 16384 sectors
constexpr std::uint32_t kBs = 4096;
// tmpfs: the image's speed must not depend on what else writes to the disk under /tmp (a loaded
// build host made O_DIRECT writes there take most of a second).
constexpr const char* kImageDir = "/dev/shm";

// A vhostkit-blk device served over one end of a socketpair on its own thread.
struct Backend {
  Backend(const std::string& image, std::uint16_t queues, bool ro = false,
          vhost::PollMode mode = vhost::PollMode::event)
      : dev(blk::testing::open_device(image, ro, queues)),
        device(*dev,
               vhost::DeviceOptions{.name = "blk-pair", .mode = mode, .queues_per_worker = 1}) {
    auto p = vhost_user::socketpair();
    EXPECT_TRUE(p);
    frontend_end = std::move(p->first);
    session.emplace(device, std::move(p->second));
    thread = std::thread([this] { result = session->run(stop.get()); });
  }
  ~Backend() {
    const std::uint64_t one = 1;
    EXPECT_EQ(::write(stop.get(), &one, sizeof one), 8);
    thread.join();
  }
  std::unique_ptr<blk::BlkDevice> dev;
  vhost::Device device;
  std::optional<vhost_user::BackendSession> session;
  vhost_user::Channel frontend_end;
  UniqueFd stop{::eventfd(0, EFD_CLOEXEC)};
  Result<> result;
  std::thread thread;
};

std::unique_ptr<BlkDriver> connect(Backend& b, std::uint16_t queues = 1, std::uint16_t depth = 32) {
  BlkDriverOptions o;
  o.channel = std::move(b.frontend_end);
  o.num_queues = queues;
  o.depth = depth;
  o.max_data = kBs;
  auto f = BlkDriver::connect(std::move(o));
  EXPECT_TRUE(f) << f.error().message();
  return f ? std::move(*f) : nullptr;
}

// Runs until every submitted request of queue q has come back; returns slot -> status.
std::map<std::uint16_t, std::uint8_t> wait_all(BlkDriver& f, std::uint16_t q) {
  std::map<std::uint16_t, std::uint8_t> got;
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (f.inflight(q) != 0 && std::chrono::steady_clock::now() < deadline) {
    f.complete(q, [&](std::uint16_t slot, std::uint8_t st) { got[slot] = st; });
    if (f.inflight(q) != 0) f.wait_call(q, 5ms);
  }
  EXPECT_EQ(f.inflight(q), 0u);
  return got;
}

TEST(BlkDriverPair, ReadsGeometryFromConfigSpace) {
  TempImage img(kImageBytes, kImageDir);
  Backend b(img.path(), 2);
  auto f = connect(b, 2);
  ASSERT_TRUE(f);
  EXPECT_EQ(f->info().capacity, kImageBytes / 512);
  EXPECT_EQ(f->info().blk_size, 512u);
  EXPECT_EQ(f->info().num_queues, 2u);
  EXPECT_EQ(f->info().seg_max, blk::BlkDevice::kSegMax);
  EXPECT_EQ(f->info().size_max, blk::BlkDevice::kMaxTransfer);
  EXPECT_TRUE(f->info().flush);
  EXPECT_FALSE(f->info().read_only);
  EXPECT_EQ(f->num_queues(), 2u);
  EXPECT_TRUE(virtio::has(f->session().features(), virtio::blk_feature::mq));
  // The driver does not wait for the last ring message's answer: the session thread starts the
  // rings a moment after connect() returns.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!(b.device.queue(0).started() && b.device.queue(1).started()) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_TRUE(b.device.queue(0).started());
  EXPECT_TRUE(b.device.queue(1).started());
}

TEST(BlkDriverPair, RandomWritesThenReadsReturnTheData) {
  TempImage img(kImageBytes, kImageDir);
  Backend b(img.path(), 1);
  auto f = connect(b, 1, 32);
  ASSERT_TRUE(f);
  const std::uint64_t blocks = kImageBytes / kBs;
  std::mt19937_64 rng(7);
  std::map<std::uint64_t, Bytes> written;  // block -> content (later writes win)
  // 400 writes in batches of up to 32, each block's content unique to (block, write number).
  int n = 0;
  while (n < 400) {
    std::map<std::uint16_t, std::uint64_t> batch;
    for (int slot; n < 400 && (slot = f->acquire(0)) >= 0; ++n) {
      std::uint64_t blk = rng() % blocks;
      while (std::any_of(batch.begin(), batch.end(), [&](auto& e) { return e.second == blk; })) {
        blk = rng() % blocks;  // one write per block in flight: their order is not defined
      }
      Bytes data = blk::testing::pattern(kBs, static_cast<std::uint32_t>(blk * 1000 + n));
      std::memcpy(f->data(0, static_cast<std::uint16_t>(slot)), data.data(), kBs);
      ASSERT_TRUE(
          f->submit(0, static_cast<std::uint16_t>(slot), virtio::blk_type::out, blk * 8, kBs));
      batch[static_cast<std::uint16_t>(slot)] = blk;
      written[blk] = std::move(data);
    }
    f->publish(0);
    auto done = wait_all(*f, 0);
    ASSERT_EQ(done.size(), batch.size());
    for (auto& [slot, st] : done) EXPECT_EQ(st, virtio::kBlkSOk) << "slot " << slot;
  }
  // Read every written block back through the device, a batch at a time.
  auto it = written.begin();
  std::size_t checked = 0;
  while (it != written.end()) {
    std::map<std::uint16_t, std::uint64_t> batch;
    for (int slot; it != written.end() && (slot = f->acquire(0)) >= 0; ++it) {
      std::memset(f->data(0, static_cast<std::uint16_t>(slot)), 0, kBs);
      ASSERT_TRUE(
          f->submit(0, static_cast<std::uint16_t>(slot), virtio::blk_type::in, it->first * 8, kBs));
      batch[static_cast<std::uint16_t>(slot)] = it->first;
    }
    f->publish(0);
    auto done = wait_all(*f, 0);
    ASSERT_EQ(done.size(), batch.size());
    for (auto& [slot, blk] : batch) {
      EXPECT_EQ(done[slot], virtio::kBlkSOk);
      const Bytes& want = written[blk];
      EXPECT_EQ(std::memcmp(f->data(0, slot), want.data(), kBs), 0) << "block " << blk;
      ++checked;
    }
  }
  EXPECT_EQ(checked, written.size());
  // A flush, then the image file holds the same data.
  const int slot = f->acquire(0);
  ASSERT_GE(slot, 0);
  ASSERT_TRUE(f->submit(0, static_cast<std::uint16_t>(slot), virtio::blk_type::flush, 0, 0));
  f->publish(0);
  auto done = wait_all(*f, 0);
  EXPECT_EQ(done[static_cast<std::uint16_t>(slot)], virtio::kBlkSOk);
  for (auto& [blk, want] : written) {
    EXPECT_EQ(img.read(blk * kBs, kBs), want) << "block " << blk << " in the image";
  }
  EXPECT_EQ(b.dev->stats(0).writes, 400u);
  EXPECT_EQ(b.dev->stats(0).reads, written.size());
}

TEST(BlkDriverPair, BadSubmissionsAreRefusedLocally) {
  TempImage img(kImageBytes, kImageDir);
  Backend b(img.path(), 1);
  auto f = connect(b, 1, 4);
  ASSERT_TRUE(f);
  const int slot = f->acquire(0);
  ASSERT_GE(slot, 0);
  const auto s = static_cast<std::uint16_t>(slot);
  EXPECT_FALSE(f->submit(0, s, virtio::blk_type::in, 0, kBs + 512));  // over max_data
  EXPECT_FALSE(f->submit(0, s, virtio::blk_type::in, 0, 100));        // not whole sectors
  EXPECT_FALSE(f->submit(0, s, virtio::blk_type::flush, 0, 512));     // FLUSH carries no data
  EXPECT_FALSE(f->submit(0, s, virtio::blk_type::in, 0, 0));          // IN without data
  f->release(0, s);
  // Only `depth` slots exist.
  for (int i = 0; i < 4; ++i) EXPECT_GE(f->acquire(0), 0);
  EXPECT_EQ(f->acquire(0), -1);
}

TEST(BlkDriverPair, OutOfRangeSectorCompletesWithIoErr) {
  TempImage img(kImageBytes, kImageDir);
  Backend b(img.path(), 1);
  auto f = connect(b);
  ASSERT_TRUE(f);
  const int slot = f->acquire(0);
  ASSERT_TRUE(f->submit(0, static_cast<std::uint16_t>(slot), virtio::blk_type::in,
                        f->info().capacity, kBs));
  f->publish(0);
  auto done = wait_all(*f, 0);
  EXPECT_EQ(done[static_cast<std::uint16_t>(slot)], virtio::kBlkSIoErr);
}

// Long enough that a loaded 2-core CI host (busy pollers, ASan, ctest -j2) still completes
// requests in the measured window; once it measured none in 0.5 s with the host at load 8.
vb::BlkRunConfig short_run(vb::BlkRw rw, bool busy) {
  return vb::BlkRunConfig{.label = "test",
                          .rw = rw,
                          .bs = kBs,
                          .duration = 1.0,
                          .warmup = 0.1,
                          .busy = busy,
                          .cpus = {},
                          .live = false};
}

class BlkBenchRun : public ::testing::TestWithParam<std::tuple<vb::BlkRw, bool>> {};

TEST_P(BlkBenchRun, CompletesWithoutErrorsAndMeasuresLatency) {
  const auto [rw, busy] = GetParam();
  TempImage img(kImageBytes, kImageDir);
  Backend b(img.path(), 2, false, busy ? vhost::PollMode::busy : vhost::PollMode::event);
  auto f = connect(b, 2, 8);
  ASSERT_TRUE(f);
  const int sigfd = ::eventfd(0, EFD_CLOEXEC);  // never fires
  bool stopped = false;
  const vb::BlkResult r = vb::run_blk(*f, short_run(rw, busy), sigfd, stopped);
  ::close(sigfd);
  EXPECT_FALSE(stopped);
  EXPECT_EQ(r.errors, 0u);
  EXPECT_GT(r.requests, 0u);
  EXPECT_GT(r.iops, 0.0);
  EXPECT_EQ(r.queues, 2u);
  EXPECT_EQ(r.iodepth, 8u);
  EXPECT_GE(r.total, r.requests);
  EXPECT_GT(r.samples, 0u);
  EXPECT_GT(r.p50_us, 0.0);
  EXPECT_LE(r.p50_us, r.p99_us);
  EXPECT_LE(r.p99_us, r.p999_us);
  // Every request the bench counted reached the device, on both queues.
  const auto s0 = b.dev->stats(0), s1 = b.dev->stats(1);
  const std::uint64_t device_done =
      rw == vb::BlkRw::randread ? s0.reads + s1.reads : s0.writes + s1.writes;
  EXPECT_EQ(device_done, r.total);
  EXPECT_GT(rw == vb::BlkRw::randread ? s0.reads : s0.writes, 0u);
  EXPECT_GT(rw == vb::BlkRw::randread ? s1.reads : s1.writes, 0u);
  EXPECT_EQ(f->inflight(0), 0u);
}

INSTANTIATE_TEST_SUITE_P(Modes, BlkBenchRun,
                         ::testing::Combine(::testing::Values(vb::BlkRw::randread,
                                                              vb::BlkRw::randwrite),
                                            ::testing::Bool()),
                         [](const auto& i) {
                           return std::string(vb::to_string(std::get<0>(i.param))) +
                                  (std::get<1>(i.param) ? "_busy" : "_event");
                         });

TEST(BlkBenchRunErrors, WritesToAReadOnlyDiskCountAsErrors) {
  TempImage img(kImageBytes, kImageDir);
  Backend b(img.path(), 1, /*ro=*/true);
  auto f = connect(b, 1, 4);
  ASSERT_TRUE(f);
  EXPECT_TRUE(f->info().read_only);
  const int sigfd = ::eventfd(0, EFD_CLOEXEC);
  bool stopped = false;
  const vb::BlkResult r = vb::run_blk(*f, short_run(vb::BlkRw::randwrite, false), sigfd, stopped);
  ::close(sigfd);
  EXPECT_GT(r.total, 0u);
  EXPECT_EQ(r.errors, r.total);  // every one answered IOERR
}

}  // namespace
}  // namespace vhostkit

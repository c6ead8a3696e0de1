// BlkDevice through a vhost::Device, driven by an in-process guest driver on memfd memory.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <string>
#include <vector>

#include <linux/magic.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "testing/blk_rig.h"
#include "testing/dirty_log.h"

namespace vhostkit::blk::testing {
namespace {

using virtio::kBlkSIoErr;

constexpr std::size_t kImage = 4 << 20;  // 8192 sectors

// What O_DIRECT does in a directory: a file there may refuse it at open (tmpfs before Linux 6.6,
// ramfs, some overlay file systems), or take the open and refuse the I/O.
struct DirectProbe {
  bool opens = false;  // open(O_DIRECT) succeeds: BlkDevice reports direct_io()
  bool works = false;  // and an aligned 4 KiB write and read through it succeed
};

DirectProbe probe_direct(const std::string& dir) {
  DirectProbe p;
  std::string path = dir + "/vhostkit-odirect-probe-XXXXXX";
  const int fd = ::mkstemp(path.data());
  if (fd < 0) return p;
  ::close(fd);
  const int dfd = ::open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  if (dfd >= 0) {
    p.opens = true;
    void* buf = nullptr;
    if (::posix_memalign(&buf, 4096, 4096) == 0) {
      std::memset(buf, 0x5a, 4096);
      p.works = ::pwrite(dfd, buf, 4096, 0) == 4096 && ::pread(dfd, buf, 4096, 0) == 4096;
      std::free(buf);
    }
    ::close(dfd);
  }
  ::unlink(path.c_str());
  return p;
}

// Where the request tests put their images. They want O_DIRECT (aligned requests go straight to
// the file, misaligned ones the buffered way), but /tmp is tmpfs on many hosts and overlay file
// systems may refuse it: the first of /var/tmp, the build tree (this binary's directory) and /tmp
// where O_DIRECT works. Where it works nowhere, the tests check the documented fallback instead
// (a directory refusing O_DIRECT at open: buffered I/O; one refusing only the I/O: each request
// retried buffered), and say so on stderr.
struct ImageDir {
  std::string path;
  DirectProbe direct;
};

const ImageDir& image_dir() {
  static const ImageDir d = [] {
    std::vector<std::string> dirs = {"/var/tmp"};
    std::error_code ec;
    const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (!ec) dirs.push_back(exe.parent_path().string());
    dirs.push_back("/tmp");
    std::vector<ImageDir> seen;
    for (const auto& dir : dirs) {
      seen.push_back(ImageDir{dir, probe_direct(dir)});
      if (seen.back().direct.works) return seen.back();
    }
    // The plain fallback (refused at open) where there is one.
    ImageDir pick = seen.back();
    for (const auto& s : seen) {
      if (!s.direct.opens) {
        pick = s;
        break;
      }
    }
    std::fprintf(stderr,
                 "blk_device_test: O_DIRECT works in none of /var/tmp, the build dir, /tmp: the "
                 "request tests check the fallback in %s (O_DIRECT %s at open)\n",
                 pick.path.c_str(), pick.direct.opens ? "taken" : "refused");
    return pick;
  }();
  return d;
}

struct RigOpts {
  bool ro = false;
  std::uint16_t queues = 1;
  vhost::PollMode mode = vhost::PollMode::event;
  std::string dir = image_dir().path;
  bool direct = true;
  std::uint16_t ring_size = 128;
  IoPath io = IoPath::automatic;
  std::chrono::microseconds latency{0};
};

struct Rig {
  explicit Rig(RigOpts o = {})
      : img(kImage, o.dir.c_str()),
        blk(open_device(img.path(), o.ro, o.queues, o.direct, o.io, o.latency)),
        dev(*blk, dev_opts(o.mode)),
        guest(o.queues, kFeatures, o.ring_size) {
    guest.bring_up(dev);
  }
  TempImage img;
  std::unique_ptr<BlkDevice> blk;
  vhost::Device dev;
  BlkGuest guest;
};

TEST(BlkDevice, OpenChecksImage) {
  BlkOptions o;
  o.image = "/nonexistent/vhostkit.img";
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  TempImage odd(1000);
  o.image = odd.path();
  auto r = BlkDevice::open(o);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().detail.find("multiple of 512"), std::string::npos);
  TempImage good(8192);
  o.image = good.path();
  o.num_queues = 0;
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  o.num_queues = 1;
  o.blk_size = 1024;
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  o.blk_size = 4096;
  auto ok = BlkDevice::open(o);
  ASSERT_TRUE(ok.has_value());
  EXPECT_EQ((*ok)->capacity_sectors(), 16u);
  // An added latency: at most kMaxAddedLatency, and never on the inline path, which answers
  // each request at once.
  o.added_latency = BlkDevice::kMaxAddedLatency + std::chrono::microseconds(1);
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  o.added_latency = std::chrono::microseconds(-1);
  EXPECT_FALSE(BlkDevice::open(o).has_value());
  o.added_latency = std::chrono::milliseconds(1);
  o.io = IoPath::inline_call;
  auto inline_delayed = BlkDevice::open(o);
  ASSERT_FALSE(inline_delayed.has_value());
  EXPECT_NE(inline_delayed.error().detail.find("io_uring"), std::string::npos);
}

TEST(BlkDevice, FeaturesAndConfig) {
  TempImage img(kImage);
  auto blk = open_device(img.path(), false, 2);
  const std::uint64_t f = blk->features();
  for (unsigned b : {bf::seg_max, bf::blk_size, bf::flush, bf::mq, bf::discard, bf::write_zeroes}) {
    EXPECT_TRUE(virtio::has(f, b)) << b;
  }
  EXPECT_TRUE(virtio::has(f, virtio::feature::version_1));
  EXPECT_FALSE(virtio::has(f, bf::ro));
  EXPECT_TRUE(virtio::has(f, bf::size_max));
  EXPECT_EQ(blk->num_queues(), 2);
  virtio::VirtioBlkConfig c{};
  ASSERT_TRUE(blk->read_config(0, {reinterpret_cast<std::uint8_t*>(&c), sizeof c}).has_value());
  EXPECT_EQ(c.capacity, kImage / 512);
  EXPECT_EQ(c.blk_size, 512u);
  EXPECT_EQ(c.seg_max, BlkDevice::kSegMax);
  EXPECT_EQ(c.size_max, BlkDevice::kMaxTransfer);
  EXPECT_EQ(c.num_queues, 2);
  EXPECT_EQ(c.max_discard_seg, 1u);
  EXPECT_GT(c.max_write_zeroes_sectors, 0u);
  // A partial read at an offset, and a read past the end (zeros) both work.
  std::uint16_t nq = 0;
  ASSERT_TRUE(blk->read_config(34, {reinterpret_cast<std::uint8_t*>(&nq), 2}).has_value());
  EXPECT_EQ(nq, 2);
  std::uint8_t big[100];
  std::memset(big, 0xff, sizeof big);
  ASSERT_TRUE(blk->read_config(0, big).has_value());
  EXPECT_EQ(big[99], 0);
  EXPECT_FALSE(blk->read_config(200, big).has_value());

  auto ro = open_device(img.path(), true);
  EXPECT_TRUE(virtio::has(ro->features(), bf::ro));
}

// The request tests run on both I/O paths: io_uring and plain calls on the worker.
class BlkIo : public ::testing::TestWithParam<IoPath> {
 protected:
  RigOpts opts() const {
    RigOpts o;
    o.io = GetParam();
    return o;
  }
};

INSTANTIATE_TEST_SUITE_P(Path, BlkIo, ::testing::Values(IoPath::uring, IoPath::inline_call),
                         [](const auto& i) {
                           return i.param == IoPath::uring ? "uring" : "inline";
                         });

// The file systems BlkDevice calls memory-backed.
bool fs_is_memory(const std::string& dir) {
  struct statfs fs{};
  if (::statfs(dir.c_str(), &fs) != 0) return false;
  const auto t = static_cast<unsigned long>(fs.f_type);
  return t == TMPFS_MAGIC || t == RAMFS_MAGIC || t == HUGETLBFS_MAGIC;
}

TEST(BlkDevice, AutomaticIoPathFollowsTheFileSystem) {
  TempImage shm(kImage, "/dev/shm");
  auto a = open_device(shm.path());
  EXPECT_TRUE(a->memory_backed());
  EXPECT_EQ(a->io_path(), IoPath::inline_call);
  // The image directory is a disk file system on most hosts (O_DIRECT was asked of it).
  const std::string& dir = image_dir().path;
  TempImage tmp(kImage, dir.c_str());
  auto b = open_device(tmp.path());
  EXPECT_EQ(b->memory_backed(), fs_is_memory(dir)) << dir;
  EXPECT_EQ(b->io_path(), fs_is_memory(dir) ? IoPath::inline_call : IoPath::uring) << dir;
  // Asked for, either path is taken wherever the image is.
  EXPECT_EQ(open_device(shm.path(), false, 1, true, IoPath::uring)->io_path(), IoPath::uring);
  EXPECT_EQ(open_device(tmp.path(), false, 1, true, IoPath::inline_call)->io_path(),
            IoPath::inline_call);
}

// An added latency makes the automatic path io_uring even for an image in memory.
TEST(BlkDevice, AddedLatencyTakesTheUringPath) {
  TempImage shm(kImage, "/dev/shm");
  auto d = open_device(shm.path(), false, 1, true, IoPath::automatic, std::chrono::milliseconds(1));
  ASSERT_TRUE(d);
  EXPECT_TRUE(d->memory_backed());
  EXPECT_EQ(d->io_path(), IoPath::uring);
  EXPECT_EQ(d->added_latency(), std::chrono::milliseconds(1));
}

// Every answer comes at least the added latency after its request; requests overlap (their
// timers run side by side) and their data is what it would be without the delay.
TEST(BlkDevice, AddedLatencyHoldsEachAnswerBack) {
  using std::chrono::steady_clock;
  constexpr auto kLatency = std::chrono::milliseconds(40);
  RigOpts o;
  o.io = IoPath::uring;
  o.latency = kLatency;
  Rig r(o);
  const Bytes data = pattern(8 * 4096, 11);
  auto t0 = steady_clock::now();
  std::vector<std::uint16_t> writes;
  for (unsigned i = 0; i < 8; ++i) {
    auto w = r.guest.request(0, virtio::blk_type::out, 8 * i,
                             Bytes(data.begin() + 4096 * i, data.begin() + 4096 * (i + 1)));
    ASSERT_TRUE(w);
    writes.push_back(*w);
  }
  auto got = r.guest.complete(0, writes.size());
  EXPECT_GE(steady_clock::now() - t0, kLatency);
  ASSERT_EQ(got.size(), writes.size());
  for (std::uint16_t w : writes) EXPECT_EQ(r.guest.status(0, w), virtio::kBlkSOk);
  EXPECT_EQ(r.img.read(0, data.size()), data);

  t0 = steady_clock::now();
  auto rd = r.guest.request(0, virtio::blk_type::in, 0, {}, data.size(), 4);
  ASSERT_TRUE(rd);
  auto [s, len] = r.guest.run(0, *rd);
  EXPECT_GE(steady_clock::now() - t0, kLatency);
  EXPECT_EQ(s, virtio::kBlkSOk);
  EXPECT_EQ(len, data.size() + 1);
  EXPECT_EQ(r.guest.data(0, *rd, data.size()), data);
  EXPECT_EQ(r.blk->inflight(0), 0u);
  const BlkStats st = r.blk->stats(0);
  EXPECT_EQ(st.writes, 8u);
  EXPECT_EQ(st.reads, 1u);
  EXPECT_EQ(st.io_errors, 0u);
}

// A failed I/O breaks the link to its timer: it is answered (IOERR) at once, not after the
// latency, and the queue stops without waiting for the timer either.
TEST(BlkDevice, AddedLatencyAnswersAFailedIoAtOnce) {
  RigOpts o;
  o.io = IoPath::uring;
  o.latency = BlkDevice::kMaxAddedLatency;  // 10 s: far longer than the wait below
  Rig r(o);
  // The image shrinks under the device: a read past the new end comes back short.
  ASSERT_EQ(::truncate(r.img.path().c_str(), kImage / 2), 0);
  auto rd = r.guest.request(0, virtio::blk_type::in, kImage / 512 - 8, {}, 4096);
  ASSERT_TRUE(rd);
  auto got = r.guest.complete(0, 1, /*timeout_ms=*/5000);
  ASSERT_EQ(got.size(), 1u) << "the failed read waited for its timer";
  EXPECT_EQ(r.guest.status(0, *rd), kBlkSIoErr);
  EXPECT_EQ(r.blk->stats(0).io_errors, 1u);
  EXPECT_EQ(r.blk->inflight(0), 0u);
}

// A request held in flight (an added latency of 300 ms) when the front-end replaces the memory
// table under the running ring, or stops the ring (GET_VRING_BASE): the device waits for it and
// answers it first, through the memory it was made in. When the call returns the used entry is
// there and the write is in the image; without the wait it would come 300 ms later, through a
// mapping already gone (the table) or a ring already handed back (the stop).
class BlkInFlightAtChange : public ::testing::TestWithParam<bool> {};

INSTANTIATE_TEST_SUITE_P(Change, BlkInFlightAtChange, ::testing::Bool(), [](const auto& i) {
  return i.param ? "set_mem_table" : "get_vring_base";
});

TEST_P(BlkInFlightAtChange, RequestIsAnsweredBeforeTheCallReturns) {
  RigOpts o;
  o.io = IoPath::uring;
  o.latency = std::chrono::milliseconds(300);
  Rig r(o);
  const Bytes data = pattern(4 * 4096, 21);
  auto w = r.guest.request(0, virtio::blk_type::out, 64, data, 0, 2);
  ASSERT_TRUE(w);
  ASSERT_TRUE(r.guest.kick(0));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (r.blk->inflight(0) == 0 && std::chrono::steady_clock::now() < deadline) {
    ::usleep(200);
  }
  ASSERT_EQ(r.blk->inflight(0), 1u) << "the write never went in flight";
  const bool mem_table = GetParam();
  if (mem_table) {
    auto m = r.dev.set_mem_table(r.guest.table());
    ASSERT_TRUE(m.has_value()) << m.error().message();
  } else {
    auto base = r.dev.get_vring_base(0);
    ASSERT_TRUE(base.has_value()) << base.error().message();
    EXPECT_EQ(*base, 1u);
  }
  EXPECT_EQ(r.blk->inflight(0), 0u);
  auto got = r.guest.reclaim(0);  // no waiting: the answer is already in the used ring
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got.count(*w), 1u);
  EXPECT_EQ(r.guest.status(0, *w), virtio::kBlkSOk);
  EXPECT_EQ(r.img.read(64 * 512, data.size()), data);
  if (mem_table) {
    // The ring runs on over the new table.
    auto rd = r.guest.request(0, virtio::blk_type::in, 64, {}, data.size());
    ASSERT_TRUE(rd);
    EXPECT_EQ(r.guest.run(0, *rd).first, virtio::kBlkSOk);
    EXPECT_EQ(r.guest.data(0, *rd, data.size()), data);
  }
}

TEST_P(BlkIo, WriteThenReadBack) {
  Rig r(opts());
  // O_DIRECT where the probe found it works; the fallback where it found no such place.
  const DirectProbe& d = image_dir().direct;
  EXPECT_EQ(r.blk->direct_io(), d.opens) << image_dir().path;
  EXPECT_EQ(r.blk->io_path(), GetParam());
  const Bytes data = pattern(64 * 1024, 1);
  auto w = r.guest.request(0, virtio::blk_type::out, 100, data, 0, 4);
  ASSERT_TRUE(w);
  auto [ws, wlen] = r.guest.run(0, *w);
  EXPECT_EQ(ws, virtio::kBlkSOk);
  EXPECT_EQ(wlen, 1u);
  EXPECT_EQ(r.img.read(100 * 512, data.size()), data);

  auto rd = r.guest.request(0, virtio::blk_type::in, 100, {}, 64 * 1024, 3);
  ASSERT_TRUE(rd);
  auto [rs, rlen] = r.guest.run(0, *rd);
  EXPECT_EQ(rs, virtio::kBlkSOk);
  EXPECT_EQ(rlen, 64u * 1024 + 1);
  EXPECT_EQ(r.guest.data(0, *rd, data.size()), data);
  auto st = r.blk->stats(0);
  EXPECT_EQ(st.reads, 1u);
  EXPECT_EQ(st.writes, 1u);
  EXPECT_EQ(st.bytes_written, data.size());
  // Aligned requests go the buffered way only when O_DIRECT took the open and refused the I/O.
  EXPECT_EQ(st.buffered, d.opens && !d.works ? 2u : 0u);
}

// Live migration: with LOG_ALL acked on the running rings, a read's data pages and every status
// byte's page are marked; a write's data (the device only reads it) is not.
TEST_P(BlkIo, DirtyLogMarksReadDataAndStatusBytes) {
  Rig r(opts());
  vhostkit::testing::SharedLog log;
  ASSERT_TRUE(log.ok());
  r.dev.add_offered_features(virtio::bit(virtio::feature::log_all));
  ASSERT_TRUE(r.dev.set_log_base(log.fd(), log.size(), 0));
  ASSERT_TRUE(r.dev.set_features(kFeatures | virtio::bit(virtio::feature::log_all)));
  const Bytes data = pattern(64 * 1024, 3);
  auto w = r.guest.request(0, virtio::blk_type::out, 8, data, 0, 4);
  ASSERT_TRUE(w);
  EXPECT_EQ(r.guest.run(0, *w).first, virtio::kBlkSOk);
  const std::uint64_t wbase = r.guest.slot_gpa(0, *w);
  EXPECT_TRUE(log.dirty(wbase + BlkGuest::kStatusOff));
  EXPECT_FALSE(log.dirty(wbase + BlkGuest::kDataOff));
  EXPECT_FALSE(log.dirty(wbase + BlkGuest::kDataOff + data.size() - 1));

  auto rd = r.guest.request(0, virtio::blk_type::in, 8, {}, 64 * 1024, 3);
  ASSERT_TRUE(rd);
  EXPECT_EQ(r.guest.run(0, *rd).first, virtio::kBlkSOk);
  EXPECT_EQ(r.guest.data(0, *rd, data.size()), data);
  const std::uint64_t rbase = r.guest.slot_gpa(0, *rd);
  EXPECT_TRUE(log.dirty(rbase + BlkGuest::kStatusOff));
  EXPECT_TRUE(log.all_dirty(rbase + BlkGuest::kDataOff, data.size()));
  // Not a page more than the request's: the page after its data stays clean.
  EXPECT_FALSE(log.dirty(rbase + BlkGuest::kDataOff + data.size()));
}

TEST_P(BlkIo, ReadsTheLastSector) {
  Rig r(opts());
  auto rd = r.guest.request(0, virtio::blk_type::in, kImage / 512 - 1, {}, 512);
  auto [s, len] = r.guest.run(0, *rd);
  EXPECT_EQ(s, virtio::kBlkSOk);
  EXPECT_EQ(len, 513u);
  EXPECT_EQ(r.guest.data(0, *rd, 512), r.img.read(kImage - 512, 512));
}

TEST_P(BlkIo, MisalignedBuffersGoBuffered) {
  Rig r(opts());
  const Bytes data = pattern(4096, 2);
  auto w = r.guest.request(0, virtio::blk_type::out, 8, data, 0, 1, /*data_shift=*/3);
  EXPECT_EQ(r.guest.run(0, *w).first, virtio::kBlkSOk);
  EXPECT_EQ(r.img.read(8 * 512, data.size()), data);
  auto rd = r.guest.request(0, virtio::blk_type::in, 8, {}, 4096, 2, /*data_shift=*/5);
  EXPECT_EQ(r.guest.run(0, *rd).first, virtio::kBlkSOk);
  EXPECT_EQ(r.guest.data(0, *rd, data.size(), 5), data);
  // `buffered` counts requests an O_DIRECT image had to send the buffered way; a buffered image
  // (the fallback) sends every request that way and counts none.
  EXPECT_EQ(r.blk->stats(0).buffered, image_dir().direct.opens ? 2u : 0u) << image_dir().path;
}

TEST_P(BlkIo, BufferedImageWithoutODirect) {
  RigOpts o = opts();
  o.dir = "/dev/shm";
  o.direct = false;
  Rig r(o);
  EXPECT_FALSE(r.blk->direct_io());
  const Bytes data = pattern(8192, 3);
  auto w = r.guest.request(0, virtio::blk_type::out, 1, data, 0, 2, 7);
  EXPECT_EQ(r.guest.run(0, *w).first, virtio::kBlkSOk);
  EXPECT_EQ(r.img.read(512, data.size()), data);
}

TEST_P(BlkIo, Flush) {
  Rig r(opts());
  auto w = r.guest.request(0, virtio::blk_type::out, 0, pattern(512, 4));
  auto f = r.guest.request(0, virtio::blk_type::flush, 0, {});
  auto got = r.guest.complete(0, 2);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(r.guest.status(0, *w), virtio::kBlkSOk);
  EXPECT_EQ(r.guest.status(0, *f), virtio::kBlkSOk);
  EXPECT_EQ(got[*f], 1u);
  EXPECT_EQ(r.blk->stats(0).flushes, 1u);
}

TEST(BlkDevice, GetId) {
  Rig r;
  auto g = r.guest.request(0, virtio::blk_type::get_id, 0, {}, 20);
  auto [s, len] = r.guest.run(0, *g);
  EXPECT_EQ(s, virtio::kBlkSOk);
  EXPECT_EQ(len, 21u);
  const Bytes id = r.guest.data(0, *g, 20);
  const std::string expect = r.blk->serial();
  EXPECT_EQ(expect.rfind("vhostkit-", 0), 0u);
  EXPECT_EQ(std::string(id.begin(), id.begin() + expect.size()), expect);
  EXPECT_LE(expect.size(), 20u);
}

Bytes discard_seg(std::uint64_t sector, std::uint32_t n, std::uint32_t flags = 0) {
  virtio::VirtioBlkDiscardWriteZeroes s{sector, n, flags};
  Bytes b(sizeof s);
  std::memcpy(b.data(), &s, sizeof s);
  return b;
}

TEST_P(BlkIo, DiscardReadsBackZeros) {
  Rig r(opts());
  ASSERT_NE(r.img.read(16 * 512, 4096), Bytes(4096, 0));
  auto d = r.guest.request(0, virtio::blk_type::discard, 0, discard_seg(16, 8));
  EXPECT_EQ(r.guest.run(0, *d).first, virtio::kBlkSOk);
  EXPECT_EQ(r.img.read(16 * 512, 4096), Bytes(4096, 0));
  EXPECT_NE(r.img.read(24 * 512, 512), Bytes(512, 0));  // only the range
  EXPECT_EQ(r.blk->stats(0).discards, 1u);
}

TEST_P(BlkIo, WriteZeroesReadsBackZeros) {
  Rig r(opts());
  auto z = r.guest.request(0, virtio::blk_type::write_zeroes, 0, discard_seg(40, 3));
  EXPECT_EQ(r.guest.run(0, *z).first, virtio::kBlkSOk);
  EXPECT_EQ(r.img.read(40 * 512, 3 * 512), Bytes(3 * 512, 0));
  EXPECT_NE(r.img.read(43 * 512, 512), Bytes(512, 0));
  auto u = r.guest.request(0, virtio::blk_type::write_zeroes, 0,
                           discard_seg(60, 8, virtio::kBlkWriteZeroesFUnmap));
  EXPECT_EQ(r.guest.run(0, *u).first, virtio::kBlkSOk);
  EXPECT_EQ(r.img.read(60 * 512, 4096), Bytes(4096, 0));
  // Read through the device too.
  auto rd = r.guest.request(0, virtio::blk_type::in, 40, {}, 1536);
  EXPECT_EQ(r.guest.run(0, *rd).first, virtio::kBlkSOk);
  EXPECT_EQ(r.guest.data(0, *rd, 1536), Bytes(1536, 0));
}

TEST_P(BlkIo, WriteZeroesOnTmpfs) {
  RigOpts o = opts();
  o.dir = "/dev/shm";
  o.direct = false;
  Rig r(o);
  auto z = r.guest.request(0, virtio::blk_type::write_zeroes, 0, discard_seg(2, 5));
  EXPECT_EQ(r.guest.run(0, *z).first, virtio::kBlkSOk);
  EXPECT_EQ(r.img.read(2 * 512, 5 * 512), Bytes(5 * 512, 0));
  EXPECT_NE(r.img.read(7 * 512, 512), Bytes(512, 0));
}

TEST_P(BlkIo, ReadOnlyRefusesWrites) {
  RigOpts o = opts();
  o.ro = true;
  Rig r(o);
  const Bytes before = r.img.read(0, 8192);
  auto w = r.guest.request(0, virtio::blk_type::out, 0, pattern(4096, 5));
  auto [s, len] = r.guest.run(0, *w);
  EXPECT_EQ(s, kBlkSIoErr);
  EXPECT_EQ(len, 1u);
  auto d = r.guest.request(0, virtio::blk_type::discard, 0, discard_seg(0, 8));
  EXPECT_EQ(r.guest.run(0, *d).first, kBlkSIoErr);
  auto z = r.guest.request(0, virtio::blk_type::write_zeroes, 0, discard_seg(0, 8));
  EXPECT_EQ(r.guest.run(0, *z).first, kBlkSIoErr);
  EXPECT_EQ(r.img.read(0, 8192), before);
  // Reads still work.
  auto rd = r.guest.request(0, virtio::blk_type::in, 0, {}, 4096);
  EXPECT_EQ(r.guest.run(0, *rd).first, virtio::kBlkSOk);
  EXPECT_EQ(r.guest.data(0, *rd, 4096), Bytes(before.begin(), before.begin() + 4096));
}

TEST_P(BlkIo, TwoQueuesServeIndependently) {
  RigOpts o = opts();
  o.queues = 2;
  Rig r(o);
  const Bytes a = pattern(4096, 6), b = pattern(4096, 7);
  auto wa = r.guest.request(0, virtio::blk_type::out, 0, a);
  auto wb = r.guest.request(1, virtio::blk_type::out, 8, b);
  EXPECT_EQ(r.guest.run(0, *wa).first, virtio::kBlkSOk);
  EXPECT_EQ(r.guest.run(1, *wb).first, virtio::kBlkSOk);
  EXPECT_EQ(r.img.read(0, 4096), a);
  EXPECT_EQ(r.img.read(4096, 4096), b);
  EXPECT_EQ(r.blk->stats(0).writes, 1u);
  EXPECT_EQ(r.blk->stats(1).writes, 1u);
}

TEST_P(BlkIo, StopWaitsForRequestsInFlight) {
  Rig r(opts());
  std::vector<std::uint16_t> slots;
  for (int i = 0; i < 32; ++i) {
    slots.push_back(*r.guest.request(0, virtio::blk_type::out, i * 64, pattern(32768, 10 + i)));
  }
  r.guest.kick(0);
  // Stopping the ring (GET_VRING_BASE) answers every request before it returns.
  auto base = r.dev.get_vring_base(0);
  ASSERT_TRUE(base.has_value());
  auto got = r.guest.reclaim(0);
  EXPECT_EQ(*base, 32u);
  EXPECT_EQ(got.size(), 32u);
  for (auto s : slots) EXPECT_EQ(r.guest.status(0, s), virtio::kBlkSOk);
  EXPECT_EQ(r.blk->inflight(0), 0u);
}

// 1000 random reads and writes at queue depth 32, checked against a shadow copy of the image.
void random_io(vhost::PollMode mode, std::uint32_t seed, IoPath io) {
  // 32 chains of up to 8 descriptors each fit a ring of 256.
  RigOpts o;
  o.mode = mode;
  o.ring_size = 256;
  o.io = io;
  Rig r(o);
  Bytes shadow = r.img.read(0, kImage);
  std::mt19937 rng(seed);
  struct InFlight {
    bool write;
    std::uint64_t sector;
    std::size_t len;
    std::size_t shift;
  };
  std::map<std::uint16_t, InFlight> inflight;
  std::size_t issued = 0, done = 0, mismatches = 0;
  auto overlaps = [&](std::uint64_t s, std::size_t len, bool write) {
    for (auto& [k, f] : inflight) {
      if (!write && !f.write) continue;
      if (s * 512 < f.sector * 512 + f.len && f.sector * 512 < s * 512 + len) return true;
    }
    return false;
  };
  auto drain = [&](std::size_t want) {
    auto got = r.guest.complete(0, want);
    EXPECT_GE(got.size(), want);
    if (got.size() < want) return false;
    for (auto& [slot, len] : got) {
      InFlight f = inflight.at(slot);
      inflight.erase(slot);
      ++done;
      if (r.guest.status(0, slot) != virtio::kBlkSOk) {
        ++mismatches;
        continue;
      }
      if (!f.write) {
        if (len != f.len + 1) ++mismatches;
        if (r.guest.data(0, slot, f.len, f.shift) !=
            Bytes(shadow.begin() + f.sector * 512, shadow.begin() + f.sector * 512 + f.len)) {
          ++mismatches;
        }
      }
    }
    return true;
  };
  while (issued < 1000) {
    const bool write = rng() % 2;
    const std::size_t len = (1 + rng() % 128) * 512;  // up to 64 KiB
    const std::uint64_t sector = rng() % (kImage / 512 - len / 512 + 1);
    const std::size_t shift = rng() % 8 == 0 ? 512 * (rng() % 4) + (rng() % 2) : 0;
    const unsigned pieces = 1 + rng() % 6;
    if (inflight.size() >= 32 || overlaps(sector, len, write)) {
      if (!drain(1)) break;
      continue;
    }
    std::optional<std::uint16_t> slot;
    if (write) {
      Bytes data = pattern(len, static_cast<std::uint32_t>(rng()));
      std::copy(data.begin(), data.end(), shadow.begin() + sector * 512);
      slot = r.guest.request(0, virtio::blk_type::out, sector, data, 0, pieces, shift);
    } else {
      slot = r.guest.request(0, virtio::blk_type::in, sector, {}, static_cast<std::uint32_t>(len),
                             pieces, shift);
    }
    ASSERT_TRUE(slot);
    inflight[*slot] = {write, sector, len, shift};
    ++issued;
    if (issued % 8 == 0) r.guest.kick(0);
  }
  while (!inflight.empty() && drain(inflight.size())) {
  }
  EXPECT_EQ(done, 1000u);
  EXPECT_EQ(mismatches, 0u);
  EXPECT_EQ(r.img.read(0, kImage), shadow);
  const auto st = r.blk->stats(0);
  EXPECT_EQ(st.reads + st.writes, 1000u);
  EXPECT_EQ(st.io_errors + st.bad_requests, 0u);
}

TEST_P(BlkIo, RandomIoQueueDepth32) { random_io(vhost::PollMode::event, 42, GetParam()); }
TEST_P(BlkIo, RandomIoBusyPolling) { random_io(vhost::PollMode::busy, 7, GetParam()); }

}  // namespace
}  // namespace vhostkit::blk::testing

// vhostkit-blk: a vhost-user virtio-blk backend. QEMU connects to its socket
// (-device vhost-user-blk-pci) and the guest gets a disk backed by a raw image file or block
// device, served through io_uring (or by plain calls when the image is in memory: --io).
// Conventions and exit codes: see backend_program.h.
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "backend_program.h"
#include "metrics_server.h"
#include "vhostkit/blk/blk_device.h"
#include "vhostkit/vhost/device.h"

namespace {

using namespace vhostkit;

struct BlkArgs {
  std::string image;
  bool read_only = false;
  unsigned queues = 1;
  unsigned blk_size = 512;
  std::string serial;
  std::string io = "auto";
  unsigned latency_us = 0;
};

void add_blk_options(CLI::App& app, BlkArgs& a) {
  app.add_option("--image", a.image, "raw disk image file or block device")->option_text("FILE");
  app.add_flag("--read-only", a.read_only, "offer a read-only disk (VIRTIO_BLK_F_RO)");
  app.add_option("--queues", a.queues, "request queues")
      ->check(CLI::Range(1u, unsigned{blk::BlkDevice::kMaxQueues}))
      ->capture_default_str();
  app.add_option("--blk-size", a.blk_size, "logical block size reported to the guest: 512 or 4096")
      ->check(CLI::IsMember({512u, 4096u}))
      ->capture_default_str();
  app.add_option("--serial", a.serial, "GET_ID serial (up to 20 bytes; default vhostkit-IMAGE)");
  app.add_option("--io", a.io,
                 "how requests reach the image: uring (io_uring, many in flight), inline (plain "
                 "calls on the queue's worker), auto (inline for an image on tmpfs, ramfs or "
                 "hugetlbfs, where a request is a memory copy; uring otherwise)")
      ->check(CLI::IsMember({"auto", "uring", "inline"}))
      ->capture_default_str();
  app.add_option("--latency-us", a.latency_us,
                 "answer each request this many microseconds after its I/O finished, to stand "
                 "in for a slower disk when testing (io_uring only; a failed I/O is answered at "
                 "once)")
      ->check(CLI::Range(0u, static_cast<unsigned>(blk::BlkDevice::kMaxAddedLatency.count())))
      ->capture_default_str();
}

// One --stats line for one queue over an interval.
void print_queue_line(std::uint16_t q, const blk::BlkStats& p, const blk::BlkStats& cur, double s) {
  std::printf(
      "q%u read %8.0f iops %8.2f MiB/s | write %8.0f iops %8.2f MiB/s | flush %llu "
      "discard %llu | ioerr %llu bad %llu\n",
      q, double(cur.reads - p.reads) / s, double(cur.bytes_read - p.bytes_read) / s / (1 << 20),
      double(cur.writes - p.writes) / s,
      double(cur.bytes_written - p.bytes_written) / s / (1 << 20),
      static_cast<unsigned long long>(cur.flushes - p.flushes),
      static_cast<unsigned long long>(cur.discards - p.discards),
      static_cast<unsigned long long>(cur.io_errors - p.io_errors),
      static_cast<unsigned long long>(cur.bad_requests + cur.no_status - p.bad_requests -
                                      p.no_status));
}

}  // namespace

int main(int argc, char** argv) {
  cli::BackendProgram prog(
      "vhostkit-blk", "blk",
      "vhostkit-blk: a vhost-user virtio-blk backend. A QEMU guest connects to the socket and "
      "gets a disk backed by a raw image file or block device, served through io_uring (or by "
      "plain calls on the worker for an image in memory, see --io).");
  BlkArgs a;
  add_blk_options(prog.app(), a);
  if (auto done = prog.parse(argc, argv)) return *done;

  if (a.image.empty()) prog.die_usage("give the disk image: --image=FILE");
  cli::BackendConfig cfg = prog.check();

  blk::IoPath io = blk::IoPath::automatic;  // --io, checked by CLI11 to be one of the three
  for (blk::IoPath p : {blk::IoPath::automatic, blk::IoPath::uring, blk::IoPath::inline_call}) {
    if (a.io == blk::to_string(p)) io = p;
  }
  blk::BlkOptions bopts;
  bopts.image = a.image;
  bopts.read_only = a.read_only;
  bopts.num_queues = static_cast<std::uint16_t>(a.queues);
  bopts.blk_size = a.blk_size;
  bopts.serial = a.serial;
  bopts.io = io;
  bopts.added_latency = std::chrono::microseconds(a.latency_us);
  // IN_ORDER is offered on the inline I/O path only (io_uring completes out of order).
  bopts.packed = cfg.packed;
  bopts.in_order = cfg.in_order;
  auto blkdev = blk::BlkDevice::open(std::move(bopts));
  if (!blkdev) prog.die_usage(blkdev.error().message());
  blk::BlkDevice& dev = **blkdev;

  // Before any thread starts, so that every thread inherits the blocked mask.
  prog.block_signals();

  // Queues are independent: spread them over the workers; without --cpu, a worker per queue.
  const vhost::DeviceOptions dopts = cfg.device_options("blk", 1, dev.num_queues());
  vhost::Device device(dev, dopts);

  vhost_user::ServerOptions sopts = std::move(cfg.server);
  sopts.session.name = "blk";

  // After the device (which it reads) and before serving; destroyed before the device.
  std::unique_ptr<cli::metrics::Server> metrics;
  if (cfg.metrics) {
    metrics = cli::metrics::start_or_report("vhostkit-blk", prog.args().metrics, *cfg.metrics, [&] {
      cli::metrics::Snapshot s;
      cli::metrics::add_device(s, "blk", device, {prog.connected(), prog.sessions()});
      cli::metrics::add_blk(s, dev);
      return s;
    });
    if (!metrics) return cli::kExitBadArgs;
    spdlog::info("vhostkit-blk: metrics at http://{}/metrics", prog.args().metrics);
  }

  spdlog::info("vhostkit-blk: {}, image {} ({} sectors, {}, I/O {}{}{}{}), {} queue(s), poll {}",
               cfg.where, a.image, dev.capacity_sectors(),
               dev.direct_io() ? "O_DIRECT" : "buffered", blk::to_string(dev.io_path()),
               io == blk::IoPath::automatic && dev.memory_backed() ? " (memory file system)" : "",
               a.latency_us != 0 ? fmt::format(", +{} us per request", a.latency_us) : "",
               dev.read_only() ? ", read-only" : "", dev.num_queues(), prog.args().poll);

  std::optional<cli::Ticker> stats;
  std::vector<blk::BlkStats> prev(dev.num_queues());
  if (cfg.stats_interval.count() > 0) {
    for (std::uint16_t q = 0; q < prev.size(); ++q) prev[q] = dev.stats(q);
    stats.emplace(cfg.stats_interval, [&](double s) {
      for (std::uint16_t q = 0; q < prev.size(); ++q) {
        const blk::BlkStats cur = dev.stats(q);
        print_queue_line(q, prev[q], cur, s);
        prev[q] = cur;
      }
      std::fflush(stdout);
    });
  }
  const int rc = prog.serve(device, std::move(sopts));
  stats.reset();
  // What this process served, for whoever reads the log after it is gone. `buffered` counts the
  // reads and writes an O_DIRECT image took through the buffered fd (not aligned for O_DIRECT):
  // bench/blk.sh --disk checks it is 0.
  for (std::uint16_t q = 0; q < dev.num_queues(); ++q) {
    const blk::BlkStats t = dev.stats(q);
    spdlog::info(
        "vhostkit-blk: totals q{} reads {} ({} bytes) writes {} ({} bytes) flushes {} "
        "discards {} get_ids {} | ioerr {} bad {} | buffered {}",
        q, t.reads, t.bytes_read, t.writes, t.bytes_written, t.flushes, t.discards, t.get_ids,
        t.io_errors, t.bad_requests + t.no_status, t.buffered);
  }
  return rc;
}

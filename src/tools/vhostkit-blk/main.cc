// vhostkit-blk: a vhost-user virtio-blk backend. QEMU connects to its socket
// (-device vhost-user-blk-pci) and the guest gets a disk backed by a raw image file or block
// device, served through io_uring.
//
// Follows QEMU's vhost-user "Backend program conventions" (--socket-path, --fd,
// --print-capabilities). Exit codes: 0 on SIGINT/SIGTERM, 2 on bad arguments or an image that
// can't be used (one line on stderr), 1 on a failure after start.
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "cli_util.h"
#include "vhostkit/blk/blk_device.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/server.h"

namespace {

using namespace vhostkit;

constexpr int kExitBadArgs = 2;

struct Args {
  std::string socket_path;
  int fd = -1;
  bool client = false;
  bool print_capabilities = false;
  std::string image;
  bool read_only = false;
  unsigned queues = 1;
  unsigned blk_size = 512;
  std::string serial;
  std::string poll = "event";
  std::string cpu;
  double stats = 0;
  std::string log_level = "info";
  unsigned spin_us = 100;
};

[[noreturn]] void die_usage(const std::string& msg) {
  std::fprintf(stderr, "vhostkit-blk: %s\n", msg.c_str());
  std::exit(kExitBadArgs);
}

void add_options(CLI::App& app, Args& a) {
  app.add_option("--socket-path", a.socket_path,
                 "vhost-user socket: listen on it (or connect to it with --client)");
  app.add_option("--fd", a.fd, "serve an already connected vhost-user socket inherited as fd N")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--client", a.client,
               "connect to --socket-path instead of listening, reconnecting when the frontend "
               "goes away");
  app.add_flag("--print-capabilities", a.print_capabilities,
               "print the backend's capabilities as JSON and exit");
  app.add_option("--image", a.image, "raw disk image file or block device")->option_text("FILE");
  app.add_flag("--read-only", a.read_only, "offer a read-only disk (VIRTIO_BLK_F_RO)");
  app.add_option("--queues", a.queues, "request queues")
      ->check(CLI::Range(1u, unsigned{blk::BlkDevice::kMaxQueues}))->capture_default_str();
  app.add_option("--blk-size", a.blk_size, "logical block size reported to the guest: 512 or 4096")
      ->check(CLI::IsMember({512u, 4096u}))->capture_default_str();
  app.add_option("--serial", a.serial, "GET_ID serial (up to 20 bytes; default vhostkit-IMAGE)");
  app.add_option("--poll", a.poll, "worker polling: event, busy or adaptive")
      ->check(CLI::IsMember({"event", "busy", "adaptive"}))->capture_default_str();
  app.add_option("--cpu", a.cpu, "pin one worker per listed CPU, e.g. 1 or 0,2-3")
      ->option_text("LIST");
  app.add_option("--stats", a.stats, "print per-queue rates every SECONDS")
      ->check(CLI::PositiveNumber)->option_text("SECONDS");
  app.add_option("--log-level", a.log_level,
                 "trace, debug, info, warn, error, critical or off")->capture_default_str();
  app.add_option("--spin-us", a.spin_us, "adaptive polling: spin this long before sleeping")
      ->capture_default_str();
}

int print_capabilities() {
  nlohmann::json caps = {{"type", "blk"}};
  std::printf("%s\n", caps.dump().c_str());
  return 0;
}

// --stats: one line per queue per interval with the interval's rates.
class StatsPrinter {
 public:
  StatsPrinter(const blk::BlkDevice& dev, std::chrono::milliseconds interval)
      : dev_(dev), interval_(interval), thread_([this] { run(); }) {}
  ~StatsPrinter() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void run() {
    std::vector<blk::BlkStats> prev(dev_.num_queues());
    for (std::uint16_t q = 0; q < prev.size(); ++q) prev[q] = dev_.stats(q);
    auto last = std::chrono::steady_clock::now();
    std::unique_lock lk(mu_);
    while (!cv_.wait_for(lk, interval_, [this] { return stop_; })) {
      const auto now = std::chrono::steady_clock::now();
      const double s = std::chrono::duration<double>(now - last).count();
      last = now;
      for (std::uint16_t q = 0; q < prev.size(); ++q) {
        const blk::BlkStats cur = dev_.stats(q);
        const blk::BlkStats& p = prev[q];
        std::printf(
            "q%u read %8.0f iops %8.2f MiB/s | write %8.0f iops %8.2f MiB/s | flush %llu "
            "discard %llu | ioerr %llu bad %llu\n",
            q, double(cur.reads - p.reads) / s,
            double(cur.bytes_read - p.bytes_read) / s / (1 << 20),
            double(cur.writes - p.writes) / s,
            double(cur.bytes_written - p.bytes_written) / s / (1 << 20),
            static_cast<unsigned long long>(cur.flushes - p.flushes),
            static_cast<unsigned long long>(cur.discards - p.discards),
            static_cast<unsigned long long>(cur.io_errors - p.io_errors),
            static_cast<unsigned long long>(cur.bad_requests + cur.no_status - p.bad_requests -
                                            p.no_status));
        prev[q] = cur;
      }
      std::fflush(stdout);
    }
  }

  const blk::BlkDevice& dev_;
  std::chrono::milliseconds interval_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "vhostkit-blk: a vhost-user virtio-blk backend. A QEMU guest connects to the socket and "
      "gets a disk backed by a raw image file or block device, served through io_uring.",
      "vhostkit-blk"};
  Args a;
  add_options(app, a);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    die_usage(fmt::format("{} (see --help)", e.what()));
  }

  if (a.print_capabilities) return print_capabilities();

  const bool have_path = !a.socket_path.empty();
  const bool have_fd = a.fd >= 0;
  if (have_path == have_fd) die_usage("give exactly one of --socket-path=PATH or --fd=N");
  if (a.client && !have_path) die_usage("--client needs --socket-path=PATH");
  if (a.image.empty()) die_usage("give the disk image: --image=FILE");
  if (auto r = cli::set_log_level(a.log_level); !r) die_usage(r.error().detail);
  auto poll = vhost::parse_poll_mode(a.poll);
  if (!poll) die_usage(fmt::format("--poll '{}' is not event, busy or adaptive", a.poll));
  std::vector<int> cpus;
  if (!a.cpu.empty()) {
    auto c = cli::parse_cpu_list(a.cpu);
    if (!c) die_usage("--cpu: " + c.error().detail);
    cpus = std::move(*c);
  }
  if (have_fd) {
    int type = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(a.fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) {
      die_usage(fmt::format("--fd={} is not a connected stream socket", a.fd));
    }
  }

  blk::BlkOptions bopts;
  bopts.image = a.image;
  bopts.read_only = a.read_only;
  bopts.num_queues = static_cast<std::uint16_t>(a.queues);
  bopts.blk_size = a.blk_size;
  bopts.serial = a.serial;
  auto blkdev = blk::BlkDevice::open(std::move(bopts));
  if (!blkdev) die_usage(blkdev.error().message());
  blk::BlkDevice& dev = **blkdev;

  // Before any thread starts, so that every thread inherits the blocked mask.
  auto stop_fd = cli::block_stop_signals();
  if (!stop_fd) die_usage(stop_fd.error().message());

  vhost::DeviceOptions dopts;
  dopts.name = "blk";
  dopts.mode = *poll;
  dopts.cpus = cpus;
  dopts.queues_per_worker = 1;  // queues are independent: spread them over the workers
  dopts.adaptive_spin_us = a.spin_us;
  vhost::Device device(dev, dopts);

  vhost_user::ServerOptions sopts = have_fd ? vhost_user::ServerOptions::inherited(a.fd)
                                    : a.client ? vhost_user::ServerOptions::connect(a.socket_path)
                                               : vhost_user::ServerOptions::listen(a.socket_path);
  sopts.session.name = "blk";

  spdlog::info("vhostkit-blk: {} {}, image {} ({} sectors, {}{}), {} queue(s), poll {}",
               have_fd ? "fd" : (a.client ? "connecting to" : "listening on"),
               have_fd ? std::to_string(a.fd) : a.socket_path, a.image, dev.capacity_sectors(),
               dev.direct_io() ? "O_DIRECT" : "buffered", dev.read_only() ? ", read-only" : "",
               dev.num_queues(), a.poll);

  std::optional<StatsPrinter> stats;
  if (a.stats > 0) stats.emplace(dev, std::chrono::milliseconds(static_cast<long>(a.stats * 1000)));

  vhost_user::BackendServer server(device, std::move(sopts));
  auto r = server.run(stop_fd->get());
  stats.reset();
  if (!r) {
    std::fprintf(stderr, "vhostkit-blk: %s\n", r.error().message().c_str());
    return server.sessions() == 0 ? kExitBadArgs : 1;
  }
  spdlog::info("vhostkit-blk: stopped after {} session(s)", server.sessions());
  return 0;
}

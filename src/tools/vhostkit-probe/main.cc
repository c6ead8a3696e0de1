// vhostkit-probe: connects to a vhost-user net back-end as a front-end, negotiates, sets up N
// queue pairs, optionally sends K frames on every pair and counts those that come back, and
// prints one JSON object saying what happened. A diagnostic for "does this back-end work?".
//
// Exit codes: 0 success, or SIGINT/SIGTERM at any point (JSON has "interrupted": true); 1 the
// back-end could not be reached or set up (JSON has "error"); 2 bad arguments; 3 fewer frames
// came back than --expect asked for.
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "cli_util.h"
#include "vhostkit/driver/net_driver.h"
#include "vhostkit/vhost_user/channel.h"

namespace vu = vhostkit::vhost_user;
namespace vd = vhostkit::driver;
using namespace std::chrono_literals;
using json = nlohmann::json;

namespace {

constexpr std::uint8_t kSrcMac[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x01};
constexpr std::uint8_t kDstMac[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x02};
constexpr std::uint32_t kMagic = 0x766b7072;  // "vkpr": marks our frames in the payload

std::string hex(std::uint64_t v) { return fmt::format("{:#x}", v); }

// An Ethernet frame (local experimental ethertype 0x88b5) carrying the magic and a sequence.
std::size_t write_frame(std::span<std::uint8_t> out, std::size_t len, std::uint32_t seq) {
  len = std::min(len, out.size());
  std::memset(out.data(), 0, len);
  std::memcpy(out.data(), kDstMac, 6);
  std::memcpy(out.data() + 6, kSrcMac, 6);
  out[12] = 0x88;
  out[13] = 0xb5;
  std::memcpy(out.data() + 14, &kMagic, 4);
  std::memcpy(out.data() + 18, &seq, 4);
  return len;
}

struct PairResult {
  std::uint64_t sent = 0;
  std::uint64_t received = 0;   // frames that came back carrying our magic
  std::uint64_t foreign = 0;    // other frames received
  std::uint64_t lost_hint = 0;  // frames given up on (flow control only)
};

// Stops early once `stop` saw SIGINT/SIGTERM.
PairResult run_traffic(vd::NetDriver& s, std::uint16_t qp, std::uint64_t frames,
                       std::size_t frame_size, std::chrono::milliseconds wait,
                       const vhostkit::cli::ShutdownOnStop& stop) {
  PairResult r;
  const bool event = s.session().notify() == vu::FrontendOptions::Notify::event;
  auto on_frame = [&](std::span<const std::uint8_t> f) {
    std::uint32_t magic = 0;
    if (f.size() >= 22) std::memcpy(&magic, f.data() + 14, 4);
    if (magic == kMagic) {
      ++r.received;
    } else {
      ++r.foreign;
    }
  };
  auto deadline = std::chrono::steady_clock::now() + wait;
  unsigned idle = 0;
  while (r.sent < frames && std::chrono::steady_clock::now() < deadline && !stop.stopped()) {
    // Keep at most half an rx ring in flight: a back-end with nowhere to put a frame drops it.
    const std::uint64_t in_flight = r.sent - r.received - r.lost_hint;
    const std::uint64_t window = s.queue_size() / 2;
    const std::size_t n = in_flight >= window
                              ? 0
                              : std::min<std::uint64_t>({32, frames - r.sent, window - in_flight});
    const std::uint64_t base = r.sent;
    if (n != 0) {
      r.sent += s.tx_burst_fill(qp, n, [&](std::size_t i, std::span<std::uint8_t> room) {
        return write_frame(room, frame_size, static_cast<std::uint32_t>(base + i));
      });
    }
    if (s.rx_burst(qp, 64, on_frame) == 0 && n == 0) {
      // Poll mode spins: yielding on a loaded machine costs a whole time slice per window.
      const bool woke = event ? s.wait_call(vd::NetDriver::rx_index(qp), 1ms) : false;
      // Nothing for a while with a full window: assume the back-end dropped some, move on.
      if (!woke && ++idle > (event ? 1000u : 10000000u)) {
        r.lost_hint = r.sent - r.received;
        idle = 0;
      }
    } else {
      idle = 0;
    }
  }
  // Whatever is still on its way back.
  deadline = std::chrono::steady_clock::now() + wait;
  while (r.received < r.sent && std::chrono::steady_clock::now() < deadline && !stop.stopped()) {
    if (s.rx_burst(qp, 64, on_frame) == 0) {
      if (event) {
        s.wait_call(vd::NetDriver::rx_index(qp), 10ms);
      } else {
        std::this_thread::sleep_for(100us);
      }
    }
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "vhostkit-probe: connect to a vhost-user net back-end and report what it negotiates"};
  std::string socket_path, server_path, notify = "event", features_hex;
  std::uint16_t queues = 1, queue_size = 256;
  std::uint32_t buffer_size = 2048;
  std::size_t memory_mib = 0;
  std::uint64_t frames = 0, expect = 0;
  std::size_t frame_size = 64;
  unsigned timeout_ms = 2000, wait_ms = 2000;
  bool verbose = false;
  auto* sp = app.add_option("--socket-path", socket_path, "connect to the back-end listening here");
  auto* sv = app.add_option("--server", server_path,
                            "listen here and wait for the back-end to connect (its client mode)");
  sp->excludes(sv);
  app.add_option("--queues", queues, "queue pairs")->check(CLI::Range(1, 128));
  app.add_option("--queue-size", queue_size, "ring size (power of two)")
      ->check(CLI::Range(2, 32768));
  app.add_option("--buffer-size", buffer_size, "packet buffer size")->check(CLI::Range(64, 65600));
  app.add_option("--memory", memory_mib, "shared memory in MiB (0: just what is needed)");
  app.add_option("--poll", notify, "event (kick/call eventfds) or poll (no fds)")
      ->check(CLI::IsMember({"event", "poll"}));
  app.add_option("--features", features_hex, "feature bits wanted (hex); default: net defaults");
  app.add_option("--frames", frames, "frames to send on every pair and count back");
  app.add_option("--frame-size", frame_size, "frame length in bytes (no virtio-net header)")
      ->check(CLI::Range(60, 65535));
  app.add_option("--expect", expect, "exit 3 unless at least this many frames come back per pair");
  app.add_option("--timeout", timeout_ms, "ms to wait for each control reply")
      ->check(CLI::Range(1, 600000));
  app.add_option("--wait", wait_ms, "ms to wait for frames to come back")
      ->check(CLI::Range(0, 600000));
  app.add_flag("-v,--verbose", verbose, "debug logging on stderr");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "vhostkit-probe: %s\n", e.what());
    return 2;
  }
  if (socket_path.empty() && server_path.empty()) {
    std::fprintf(stderr, "vhostkit-probe: one of --socket-path or --server is required\n");
    return 2;
  }
  spdlog::set_default_logger(spdlog::stderr_color_mt("probe"));
  spdlog::set_level(verbose ? spdlog::level::debug : spdlog::level::warn);
  // Before any thread starts: SIGINT/SIGTERM end every wait below (exit 0, "interrupted").
  auto sigfd = vhostkit::cli::block_stop_signals();
  if (!sigfd) {
    std::fprintf(stderr, "vhostkit-probe: %s\n", sigfd.error().message().c_str());
    return 1;
  }

  vd::NetDriverOptions o;
  o.name = "probe";
  o.queue_pairs = queues;
  o.queue_size = queue_size;
  o.buffer_size = buffer_size;
  o.memory_size = memory_mib << 20;
  o.notify =
      notify == "poll" ? vu::FrontendOptions::Notify::poll : vu::FrontendOptions::Notify::event;
  o.timeout = std::chrono::milliseconds(timeout_ms);
  if (!features_hex.empty()) {
    try {
      o.features = std::stoull(features_hex, nullptr, 16);
    } catch (...) {
      std::fprintf(stderr, "vhostkit-probe: --features %s is not a hex number\n",
                   features_hex.c_str());
      return 2;
    }
  }
  json out;
  out["interrupted"] = false;
  auto fail_json = [&](const std::string& err) {
    out["connected"] = false;
    out["error"] = err;
    std::printf("%s\n", out.dump().c_str());
    return 1;
  };
  auto interrupted_json = [&] {
    out["interrupted"] = true;
    if (!out.contains("connected")) out["connected"] = false;
    std::printf("%s\n", out.dump().c_str());
    return 0;
  };
  if (!server_path.empty()) {
    auto l = vu::listen_unix(server_path);
    if (!l) return fail_json(fmt::format("listen on {}: {}", server_path, l.error().message()));
    auto ch = vhostkit::cli::accept_unless_stopped(l->get(), sigfd->get());
    ::unlink(server_path.c_str());
    if (!ch) return fail_json(fmt::format("accept on {}: {}", server_path, ch.error().message()));
    if (!*ch) return interrupted_json();
    o.channel = std::move(**ch);
  } else {
    auto ch = vu::connect_unix(socket_path);
    if (!ch) return fail_json(fmt::format("connect to {}: {}", socket_path, ch.error().message()));
    o.channel = std::move(*ch);
  }
  // Each reply may be awaited for --timeout ms (up to 10 minutes): a signal shuts the socket so
  // that wait, and the traffic loops, end at once.
  auto stop = vhostkit::cli::ShutdownOnStop::start(sigfd->get(), o.channel.fd());
  if (!stop) return fail_json(stop.error().message());
  const vhostkit::cli::ShutdownOnStop& watch = **stop;
  const auto t0 = std::chrono::steady_clock::now();
  auto s = vd::NetDriver::connect(std::move(o));
  // The set-up failed only because the signal shut the socket: not the back-end's error.
  if (watch.stopped()) return interrupted_json();
  if (!s) return fail_json(s.error().message());
  auto& f = **s;
  const auto setup_us =
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
  out["connected"] = true;
  out["setup_us"] = setup_us.count();
  const vu::FrontendSession& proto = f.session();
  out["offered_features"] = hex(proto.offered_features());
  out["features"] = hex(proto.features());
  out["offered_protocol_features"] = hex(proto.offered_protocol_features());
  out["protocol_features"] = hex(proto.protocol_features());
  out["backend_queue_num"] = proto.backend_queue_num();
  out["queue_pairs"] = f.queue_pairs();
  out["queue_size"] = f.queue_size();
  out["net_hdr_len"] = f.net_hdr_len();
  out["poll"] = notify;
  if (auto mac = f.mac()) {
    out["mac"] = fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", (*mac)[0], (*mac)[1],
                             (*mac)[2], (*mac)[3], (*mac)[4], (*mac)[5]);
  } else {
    out["mac"] = nullptr;
  }
  int rc = 0;
  if (frames > 0) {
    json pairs = json::array();
    const auto t1 = std::chrono::steady_clock::now();
    for (std::uint16_t qp = 0; qp < f.queue_pairs(); ++qp) {
      if (watch.stopped()) break;
      const PairResult r = run_traffic(f, qp, frames, std::min(frame_size, f.max_frame()),
                                       std::chrono::milliseconds(wait_ms), watch);
      pairs.push_back({{"pair", qp},
                       {"sent", r.sent},
                       {"received", r.received},
                       {"foreign", r.foreign},
                       {"rx_bad", f.stats(vd::NetDriver::rx_index(qp)).bad},
                       {"tx_kicks", proto.ring(vd::NetDriver::tx_index(qp)).kicks},
                       {"rx_calls", proto.ring(vd::NetDriver::rx_index(qp)).calls}});
      if (r.received < expect) rc = 3;
    }
    out["traffic_us"] =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t1)
            .count();
    out["pairs"] = pairs;
  }
  // After a signal the socket is shut: no ring can be stopped, and what was measured stands.
  if (watch.stopped()) return interrupted_json();
  auto bases = f.stop();
  if (watch.stopped()) return interrupted_json();
  if (bases) {
    out["vring_bases"] = *bases;
  } else {
    out["stop_error"] = bases.error().message();
  }
  std::printf("%s\n", out.dump().c_str());
  return rc;
}

// vhostkit-bench: a traffic generator. Connects to a vhost-user net back-end as a front-end (or
// listens and lets the back-end connect), then for each frame size in turn runs one mode for a
// warm-up and a measured window, drains, and reports: a live line each second on stderr, a
// summary table and one JSON line on stdout, optionally a CSV row per result.
//
//   txonly   transmit as fast as the transmitq takes frames
//   rxonly   count what the back-end sends (testpmd txonly on the vhost side)
//   loop     keep the transmitq full and count what the back-end reflects (a MAC-swapping
//            back-end: vhostkit-net --loopback, testpmd macswap)
//   fwd      send one burst (--burst frames), then send every frame that comes back out again
//            from the buffer it arrived in, no copy: what testpmd --forward-mode=io --tx-first
//            does, the front-end bench/backends.sh compares it with
//   latency  one frame in flight: round-trip histogram (p50, p99, p99.9, min, max)
//   blk      a vhost-user-blk back-end instead: random reads or writes (--rw, --bs), --iodepth
//            requests in flight per queue, IOPS and latency percentiles (blk_traffic.h)
//
// --ring=split|packed and --in-order ask for the packed ring and VIRTIO_F_IN_ORDER (every mode).
// A back-end that does not offer one runs without it, as a driver in a guest would, and a line
// on stderr says so; --strict makes that exit 1 instead. The table, the CSV and the JSON line
// name the layout and IN_ORDER as negotiated.
//
// Exit codes: 0 done (also after SIGINT/SIGTERM, with what was measured); 1 the back-end could
// not be reached or set up (or, with --strict, did not grant --ring/--in-order), or (blk) a
// request completed with an error; 2 bad arguments.
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <poll.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "blk_traffic.h"
#include "cli_util.h"
#include "histogram.h"
#include "report.h"
#include "traffic.h"
#include "vhostkit/driver/blk_driver.h"
#include "vhostkit/driver/net_driver.h"
#include "vhostkit/vhost_user/channel.h"

namespace vu = vhostkit::vhost_user;
namespace vd = vhostkit::driver;
namespace vb = vhostkit::bench;
using json = nlohmann::json;

namespace {

struct Args {
  std::string mode = "loop";
  std::string socket_path, server_path;
  std::string sizes = "64";
  std::uint32_t burst = 32;
  double duration = 10;
  double warmup = 1;
  std::uint16_t queues = 1;
  std::uint16_t queue_size = 256;
  // Not a power of two: with 2048-byte buffers every buffer's header line fell into the same few
  // L2 sets, and a back-end reading the headers of a full ring missed on them (vhostkit-bench
  // loop against vhostkit-net, 3 rounds: 6.8-7.1 Mpps at 2048, 7.8-9.1 at 2112 and 2240; DPDK's
  // vhost PMD the same at both). The bench/backends.sh run that followed did not show the gain
  // in its loop column (bench/cycles.md): the A/B stands alone so far.
  std::uint32_t buffer_size = 2240;
  std::string poll = "busy";
  std::string cpu;
  std::string csv;
  std::string label;
  bool json_only = false;
  unsigned reply_timeout_ms = 200;
  std::string log_level = "warn";
  std::string ring = "split";
  bool in_order = false;
  bool strict = false;
  // blk
  std::string rw = "randread";
  std::uint16_t iodepth = 32;
  std::uint32_t bs = 4096;
  bool queue_size_given = false;
};

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Sleeps up to `d`, returning false early if SIGINT/SIGTERM arrived on the signalfd.
bool sleep_unless_stopped(int sigfd, std::chrono::milliseconds d) {
  pollfd p{sigfd, POLLIN, 0};
  const int n = ::poll(&p, 1, static_cast<int>(d.count()));
  return n <= 0;
}

struct Totals {
  std::uint64_t tx = 0, rx = 0, outstanding = 0, late = 0;
  bool draining = true;  // every thread has seen the drain: tx below is final
};

Totals sum(const std::unique_ptr<vb::PairCounters[]>& c, std::uint16_t n) {
  Totals t;
  for (std::uint16_t i = 0; i < n; ++i) {
    // Read first (acquire): when set, the counts read after it are at least those it covers.
    t.draining = c[i].draining.load(std::memory_order_acquire) && t.draining;
    t.tx += c[i].tx.load(std::memory_order_relaxed);
    t.rx += c[i].rx.load(std::memory_order_relaxed);
    t.outstanding += c[i].tx_outstanding.load(std::memory_order_relaxed);
    t.late += c[i].late.load(std::memory_order_relaxed);
  }
  return t;
}

// One size: start a data thread per pair, warm up, measure, drain, stop. `stopped` is set when
// a stop signal cut the run short.
vb::RunResult run_one(vd::NetDriver& s, const Args& a, vb::Mode mode, std::uint32_t size,
                      const std::vector<int>& cpus, int sigfd, bool& stopped) {
  const std::uint16_t pairs = s.queue_pairs();
  vb::Control ctl;
  auto counters = std::make_unique<vb::PairCounters[]>(pairs);
  std::vector<std::unique_ptr<vb::Histogram>> hists;
  std::vector<std::thread> threads;
  for (std::uint16_t qp = 0; qp < pairs; ++qp) hists.push_back(std::make_unique<vb::Histogram>());
  for (std::uint16_t qp = 0; qp < pairs; ++qp) {
    vb::PairConfig pc{.mode = mode,
                      .qp = qp,
                      .size = size,
                      .burst = a.burst,
                      .busy = a.poll == "busy",
                      .cpu = cpus.empty() ? -1 : cpus[qp % cpus.size()],
                      .reply_timeout = std::chrono::milliseconds(a.reply_timeout_ms)};
    threads.emplace_back([&s, pc, &ctl, &counters, &hists, qp] {
      vb::run_pair(s, pc, ctl, counters[qp], *hists[qp]);
    });
  }
  const bool live = !a.json_only;
  const auto ms = [](double sec) {
    return std::chrono::milliseconds(static_cast<long>(sec * 1000));
  };
  if (a.warmup > 0 && !sleep_unless_stopped(sigfd, ms(a.warmup))) stopped = true;

  ctl.set(vb::Phase::measure);
  const auto t0 = std::chrono::steady_clock::now();
  const Totals start = sum(counters, pairs);
  Totals prev = start;
  auto tick = t0;
  double elapsed = 0;
  while (!stopped && elapsed < a.duration) {
    const double left = a.duration - elapsed;
    if (!sleep_unless_stopped(sigfd, ms(std::min(1.0, left)))) stopped = true;
    const auto now = std::chrono::steady_clock::now();
    const Totals cur = sum(counters, pairs);
    const double dt = std::chrono::duration<double>(now - tick).count();
    elapsed = std::chrono::duration<double>(now - t0).count();
    if (live && dt > 0) {
      // Live drops: sent minus received minus what is still on the transmitq: exact once the
      // receive side has caught up, an over-estimate by what is in flight beyond the ring.
      const std::uint64_t lost = vb::reflects(mode) && cur.tx > cur.rx + cur.outstanding
                                     ? cur.tx - cur.rx - cur.outstanding
                                     : 0;
      std::fprintf(stderr, "%s\n",
                   vb::format_live(elapsed, static_cast<double>(cur.tx - prev.tx) / dt,
                                   static_cast<double>(cur.rx - prev.rx) / dt, size, lost)
                       .c_str());
    }
    prev = cur;
    tick = now;
  }
  const Totals end = sum(counters, pairs);
  const double window = vb::seconds_since(t0);

  // Drain: stop sending; wait until everything sent came back, or nothing moved for 200 ms,
  // or 2 s passed.
  ctl.set(vb::Phase::drain);
  const auto d0 = std::chrono::steady_clock::now();
  Totals last = sum(counters, pairs);
  auto moved = d0;
  const bool reflects = vb::reflects(mode);
  while (vb::seconds_since(d0) < 2.0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    const Totals cur = sum(counters, pairs);
    if (reflects && cur.draining && cur.rx >= cur.tx) break;
    if (cur.rx != last.rx) moved = std::chrono::steady_clock::now();
    if (vb::seconds_since(moved) > 0.2) break;
    last = cur;
  }
  ctl.set(vb::Phase::done);
  for (auto& t : threads) t.join();
  const Totals fin = sum(counters, pairs);

  vb::RunResult r;
  r.label = a.label;
  r.mode = mode;
  r.size = size;
  r.poll = a.poll;
  r.ring = std::string(vu::to_string(s.layout()));
  r.in_order = s.in_order();
  r.burst = a.burst;
  r.queues = pairs;
  r.seconds = window;
  r.tx = fin.tx;
  r.rx = fin.rx;
  r.drops = reflects && fin.tx > fin.rx ? fin.tx - fin.rx : 0;
  if (window > 0) {
    r.tx_pps = static_cast<double>(end.tx - start.tx) / window;
    r.rx_pps = static_cast<double>(end.rx - start.rx) / window;
  }
  if (mode == vb::Mode::latency) vb::set_latency(r, hists);
  return r;
}

vu::RingLayout ring_of(const Args& a) {
  return a.ring == "packed" ? vu::RingLayout::packed : vu::RingLayout::split;
}

// What the back-end granted against --ring/--in-order: notes on stderr, or (--strict) false
// after the error line.
bool granted(const Args& a, vu::RingLayout got, bool got_in_order) {
  auto n = vb::check_negotiated(a.ring, a.in_order, vu::to_string(got), got_in_order, a.strict);
  if (!n) {
    std::fprintf(stderr, "vhostkit-bench: %s\n", n.error().message().c_str());
    return false;
  }
  for (const std::string& line : *n) std::fprintf(stderr, "vhostkit-bench: %s\n", line.c_str());
  return true;
}

// SIGINT/SIGTERM came before a back-end was set up: nothing was measured, but the run ended as
// asked, so the usual JSON line (no results) and exit 0.
int stopped_before_run() {
  json out = {{"tool", "vhostkit-bench"},
              {"utc", utc_now()},
              {"interrupted", true},
              {"results", json::array()}};
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

// blk mode, after the arguments were checked: set up, run, report. `watch` ends the set-up
// early on a signal; it is gone once the run starts. Returns the exit code.
int blk_main(const Args& a, vb::BlkRw rw, std::vector<int> cpus, int sigfd, vu::Channel channel,
             std::unique_ptr<vhostkit::cli::ShutdownOnStop> watch) {
  vd::BlkDriverOptions o;
  o.name = "bench";
  o.channel = std::move(channel);
  o.num_queues = a.queues;
  o.depth = a.iodepth;
  o.queue_size = a.queue_size_given ? a.queue_size : 0;
  o.max_data = a.bs;
  o.ring = ring_of(a);
  o.in_order = a.in_order;
  // Kicks stay eventfds even when we busy-poll: a back-end such as qemu-storage-daemon only
  // looks at a ring when kicked (and asks for no kicks itself when it polls).
  o.notify = vu::FrontendOptions::Notify::event;
  auto f = vd::BlkDriver::connect(std::move(o));
  if (watch->stopped()) return stopped_before_run();
  watch.reset();
  if (!f) {
    std::fprintf(stderr, "vhostkit-bench: %s\n", f.error().message().c_str());
    return 1;
  }
  vd::BlkDriver& blk = **f;
  if (!granted(a, blk.layout(), blk.in_order())) return 1;
  const vd::BlkInfo& info = blk.info();
  if (a.bs % info.blk_size != 0) {
    std::fprintf(stderr, "vhostkit-bench: --bs %u is not a multiple of the disk's block size %u\n",
                 a.bs, info.blk_size);
    return 2;
  }
  if (info.capacity * vhostkit::virtio::kBlkSectorSize < a.bs) {
    std::fprintf(stderr, "vhostkit-bench: the disk (%llu sectors) is smaller than --bs %u\n",
                 static_cast<unsigned long long>(info.capacity), a.bs);
    return 2;
  }
  if (rw == vb::BlkRw::randwrite && info.read_only) {
    std::fprintf(stderr, "vhostkit-bench: --rw=randwrite on a read-only disk\n");
    return 2;
  }
  if (!a.json_only) {
    std::fprintf(stderr,
                 "vhostkit-bench: blk %s, bs %u, iodepth %u x %u queue(s), %s ring %u%s, "
                 "disk %llu sectors (blk_size %u), features %#llx, poll %s\n",
                 std::string(vb::to_string(rw)).c_str(), a.bs, a.iodepth, blk.num_queues(),
                 std::string(vu::to_string(blk.layout())).c_str(), blk.session().queue_size(),
                 blk.in_order() ? " in order" : "", static_cast<unsigned long long>(info.capacity),
                 info.blk_size, static_cast<unsigned long long>(blk.session().features()),
                 a.poll.c_str());
  }
  vb::BlkRunConfig rc{.label = a.label,
                      .rw = rw,
                      .bs = a.bs,
                      .duration = a.duration,
                      .warmup = a.warmup,
                      .busy = a.poll == "busy",
                      .cpus = std::move(cpus),
                      .live = !a.json_only};
  bool stopped = false;
  std::vector<vb::BlkResult> results{vb::run_blk(blk, rc, sigfd, stopped)};
  for (auto& r : results) {
    r.ring = std::string(vu::to_string(blk.layout()));
    r.in_order = blk.in_order();
  }
  if (auto st = blk.stop(); !st) spdlog::warn("stopping the rings: {}", st.error().message());

  const std::string utc = utc_now();
  if (!a.csv.empty()) {
    if (auto w = vb::append_blk_csv(a.csv, results, utc); !w) {
      std::fprintf(stderr, "vhostkit-bench: %s\n", w.error().message().c_str());
    }
  }
  if (!a.json_only) std::printf("%s", vb::format_blk_table(results).c_str());
  json out = {{"tool", "vhostkit-bench"},
              {"utc", utc},
              {"features", fmt::format("{:#x}", blk.session().features())},
              {"ring", std::string(vu::to_string(blk.layout()))},
              {"in_order", blk.in_order()},
              {"capacity_sectors", info.capacity},
              {"blk_size", info.blk_size},
              {"interrupted", stopped},
              {"results", json::array()}};
  for (const auto& r : results) out["results"].push_back(vb::to_json(r));
  std::printf("%s\n", out.dump().c_str());
  std::fflush(stdout);
  if (results[0].errors != 0) {
    std::fprintf(stderr, "vhostkit-bench: %llu request(s) failed\n",
                 static_cast<unsigned long long>(results[0].errors));
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vhostkit-bench: drive a vhost-user net back-end as a front-end and measure it"};
  Args a;
  app.add_option("mode", a.mode,
                 "txonly, rxonly, loop (default), fwd, latency; blk for a block back-end")
      ->check(CLI::IsMember({"txonly", "rxonly", "loop", "fwd", "latency", "blk"}));
  auto* sp =
      app.add_option("--socket-path", a.socket_path, "connect to the back-end listening here");
  auto* sv = app.add_option("--server", a.server_path,
                            "listen here and wait for the back-end to connect (its client mode)");
  sp->excludes(sv);
  app.add_option("--size", a.sizes,
                 "frame length(s) in bytes, e.g. 64 or 64,256,1518 (run in turn)");
  app.add_option("--burst", a.burst, "frames per burst (fwd: the frames that circulate)")
      ->check(CLI::Range(1u, 256u));
  app.add_option("--duration", a.duration, "measured seconds per size")
      ->check(CLI::Range(0.1, 86400.0));
  app.add_option("--warmup", a.warmup, "seconds of traffic before measuring")
      ->check(CLI::Range(0.0, 3600.0));
  app.add_option("--queues", a.queues, "queue pairs; blk: request queues (one data thread each)")
      ->check(CLI::Range(1, 128));
  auto* qs = app.add_option("--queue-size", a.queue_size,
                            "ring size (power of two; blk default: room for --iodepth requests)")
                 ->check(CLI::IsMember(
                     {2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768}));
  app.add_option("--buffer-size", a.buffer_size,
                 "packet buffer size (best not a power of two: buffers that far apart share cache "
                 "sets)")
      ->capture_default_str()
      ->check(CLI::Range(128u, 65536u));
  app.add_option("--poll", a.poll,
                 "busy (spin; no kick/call eventfds) or event (sleep on call eventfds)")
      ->check(CLI::IsMember({"event", "busy"}));
  app.add_option("--cpu", a.cpu, "pin the data thread(s) to these CPUs, e.g. 0 or 0,1");
  app.add_option("--csv", a.csv, "append one row per result to FILE (header if new)");
  app.add_option("--label", a.label, "configuration name for the CSV/JSON");
  app.add_flag("--json", a.json_only, "print only the JSON line (no live lines, no table)");
  app.add_option("--reply-timeout", a.reply_timeout_ms, "latency: ms before a probe counts as lost")
      ->check(CLI::Range(1u, 60000u));
  app.add_option("--log-level", a.log_level, "trace, debug, info, warn (default), error, off");
  app.add_option("--ring", a.ring,
                 "split (default) or packed: the ring layout to ask for; a back-end that offers "
                 "only the split ring gets split (a line on stderr says so) unless --strict")
      ->check(CLI::IsMember({"split", "packed"}));
  app.add_flag("--in-order", a.in_order,
               "ask for VIRTIO_F_IN_ORDER too (either layout); without the back-end's offer the "
               "run goes on without it unless --strict");
  app.add_flag("--strict", a.strict,
               "exit 1 instead of running when the back-end does not grant --ring or --in-order");
  app.add_option("--rw", a.rw, "blk: randread (default) or randwrite");
  app.add_option("--iodepth", a.iodepth, "blk: requests in flight per queue (default 32)")
      ->check(CLI::Range(1, 1024));
  app.add_option("--bs", a.bs, "blk: bytes per request, a multiple of 512 (default 4096)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "vhostkit-bench: %s\n", e.what());
    return 2;
  }
  const auto bad = [](const std::string& msg) {
    std::fprintf(stderr, "vhostkit-bench: %s\n", msg.c_str());
    return 2;
  };
  if (a.socket_path.empty() == a.server_path.empty())
    return bad("one of --socket-path or --server is required");
  const auto mode = vb::parse_mode(a.mode);
  if (!mode) return bad(mode.error().message());
  {
    std::vector<std::string> given;
    for (auto names : {std::span<const std::string_view>(vb::kNetOnlyOptions),
                       std::span<const std::string_view>(vb::kBlkOnlyOptions)}) {
      for (std::string_view n : names) {
        if (app.get_option(std::string(n))->count() > 0) given.emplace_back(n);
      }
    }
    if (auto c = vb::check_mode_options(*mode, given); !c) return bad(c.error().message());
  }
  a.queue_size_given = qs->count() > 0;
  std::optional<vb::BlkRw> rw;
  if (*mode == vb::Mode::blk) {
    auto r = vb::parse_rw(a.rw);
    if (!r) return bad(r.error().message());
    rw = *r;
    if (auto b = vb::check_bs(a.bs, vd::BlkDriver::kMaxData); !b) return bad(b.error().message());
    // Three descriptors per request (header, data, status).
    if (qs->count() > 0 && a.queue_size < 3u * a.iodepth) {
      return bad(fmt::format("--queue-size {} holds {} requests, --iodepth {} wanted", a.queue_size,
                             a.queue_size / 3, a.iodepth));
    }
  }
  // The largest virtio-net header is 12 bytes.
  const auto sizes = vb::parse_sizes(a.sizes, vb::kMinFrame, a.buffer_size - 12);
  if (!sizes) return bad(sizes.error().message());
  std::vector<int> cpus;
  if (!a.cpu.empty()) {
    auto c = vhostkit::cli::parse_cpu_list(a.cpu);
    if (!c) return bad(fmt::format("--cpu: {}", c.error().message()));
    cpus = std::move(*c);
  }
  spdlog::set_default_logger(spdlog::stderr_color_mt("bench"));
  if (auto l = vhostkit::cli::set_log_level(a.log_level); !l) return bad(l.error().message());
  // Before any thread starts: SIGINT/SIGTERM end the run early (results so far are reported).
  auto sigfd = vhostkit::cli::block_stop_signals();
  if (!sigfd) {
    std::fprintf(stderr, "vhostkit-bench: %s\n", sigfd.error().message().c_str());
    return 1;
  }

  vu::Channel channel;
  if (!a.server_path.empty()) {
    auto l = vu::listen_unix(a.server_path);
    if (!l) {
      std::fprintf(stderr, "vhostkit-bench: listen on %s: %s\n", a.server_path.c_str(),
                   l.error().message().c_str());
      return 1;
    }
    auto ch = vhostkit::cli::accept_unless_stopped(l->get(), sigfd->get());
    ::unlink(a.server_path.c_str());
    if (!ch) {
      std::fprintf(stderr, "vhostkit-bench: accept on %s: %s\n", a.server_path.c_str(),
                   ch.error().message().c_str());
      return 1;
    }
    if (!*ch) return stopped_before_run();
    channel = std::move(**ch);
  } else {
    auto ch = vu::connect_unix(a.socket_path);
    if (!ch) {
      std::fprintf(stderr, "vhostkit-bench: connect to %s: %s\n", a.socket_path.c_str(),
                   ch.error().message().c_str());
      return 1;
    }
    channel = std::move(*ch);
  }
  // Setting up waits on each of the back-end's replies for up to 2 s; a signal must not wait
  // that out (or fail the set-up with exit 1): it shuts the socket and the set-up ends now.
  auto watch = vhostkit::cli::ShutdownOnStop::start(sigfd->get(), channel.fd());
  if (!watch) {
    std::fprintf(stderr, "vhostkit-bench: %s\n", watch.error().message().c_str());
    return 1;
  }
  if (*mode == vb::Mode::blk) {
    return blk_main(a, *rw, std::move(cpus), sigfd->get(), std::move(channel), std::move(*watch));
  }

  vd::NetDriverOptions o;
  o.name = "bench";
  o.queue_pairs = a.queues;
  o.queue_size = a.queue_size;
  o.buffer_size = a.buffer_size;
  // fwd sends frames back out from their rx buffers: each frame on a line of its own, as in
  // testpmd's mbufs, so that zeroing the header does not take the frame's line from the device.
  o.align_rx_frames = *mode == vb::Mode::fwd;
  o.memory_size = 0;
  o.ring = ring_of(a);
  o.in_order = a.in_order;
  o.notify =
      a.poll == "busy" ? vu::FrontendOptions::Notify::poll : vu::FrontendOptions::Notify::event;
  o.channel = std::move(channel);
  auto s = vd::NetDriver::connect(std::move(o));
  if ((*watch)->stopped()) return stopped_before_run();
  watch->reset();
  if (!s) {
    std::fprintf(stderr, "vhostkit-bench: %s\n", s.error().message().c_str());
    return 1;
  }
  auto& f = **s;
  if (!granted(a, f.layout(), f.in_order())) return 1;
  if (!a.json_only) {
    std::fprintf(stderr, "vhostkit-bench: %s, %u pair(s), %s ring %u%s, features %#llx, poll %s\n",
                 std::string(vb::to_string(*mode)).c_str(), f.queue_pairs(),
                 std::string(vu::to_string(f.layout())).c_str(), f.queue_size(),
                 f.in_order() ? " in order" : "", static_cast<unsigned long long>(f.features()),
                 a.poll.c_str());
  }

  std::vector<vb::RunResult> results;
  bool stopped = false;
  for (std::uint32_t size : *sizes) {
    if (stopped) break;
    if (!a.json_only) std::fprintf(stderr, "-- %s size %u --\n", a.mode.c_str(), size);
    results.push_back(run_one(f, a, *mode, size, cpus, sigfd->get(), stopped));
  }
  if (auto st = f.stop(); !st) spdlog::warn("stopping the rings: {}", st.error().message());

  const std::string utc = utc_now();
  if (!a.csv.empty()) {
    if (auto w = vb::append_csv(a.csv, results, utc); !w) {
      std::fprintf(stderr, "vhostkit-bench: %s\n", w.error().message().c_str());
    }
  }
  if (!a.json_only) std::printf("%s", vb::format_table(results).c_str());
  json out = {{"tool", "vhostkit-bench"},
              {"utc", utc},
              {"features", fmt::format("{:#x}", f.features())},
              {"ring", std::string(vu::to_string(f.layout()))},
              {"in_order", f.in_order()},
              {"interrupted", stopped},
              {"results", json::array()}};
  for (const auto& r : results) out["results"].push_back(vb::to_json(r));
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

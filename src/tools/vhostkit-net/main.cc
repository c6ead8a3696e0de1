// vhostkit-net: a vhost-user virtio-net backend. QEMU (or DPDK's virtio-user) connects to its
// socket and the guest gets a NIC whose frames go to a TAP device, an AF_PACKET interface, or
// straight back to the guest with the MACs swapped (--loopback).
// Conventions and exit codes: see backend_program.h.
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "backend_program.h"
#include "cli_util.h"
#include "metrics_server.h"
#include "stats_printer.h"
#include "vhostkit/net/af_packet_port.h"
#include "vhostkit/net/net_device.h"
#include "vhostkit/net/tap_port.h"
#include "vhostkit/vhost/device.h"

namespace {

using namespace vhostkit;

struct NetArgs {
  std::string tap;
  std::string af_packet;
  bool loopback = false;
  unsigned queues = 1;
  std::string mac = "52:54:00:12:34:56";
  unsigned mtu = 0;
  unsigned burst = 32;
};

void add_net_options(CLI::App& app, NetArgs& a) {
  auto* tap =
      app.add_option("--tap", a.tap, "port: open or create TAP interface IF")->option_text("IF");
  auto* af = app.add_option("--af-packet", a.af_packet,
                            "port: AF_PACKET on existing interface IF (mapped rings)")
                 ->option_text("IF");
  auto* lo = app.add_flag("--loopback", a.loopback,
                          "port: reflect every guest frame back with its MACs swapped");
  tap->excludes(af)->excludes(lo);
  af->excludes(lo);
  app.add_option("--queues", a.queues, "queue pairs")
      ->check(CLI::Range(1u, 256u))
      ->capture_default_str();
  app.add_option("--mac", a.mac, "the guest's MAC address (config space)")->capture_default_str();
  app.add_option("--mtu", a.mtu, "offer VIRTIO_NET_F_MTU with this MTU (68-65535)")
      ->check(CLI::Range(68u, 65535u));
  app.add_option("--burst", a.burst, "chains per batch")
      ->check(CLI::Range(1u, 256u))
      ->capture_default_str();
}

std::unique_ptr<net::Port> open_port(const cli::BackendProgram& prog, const NetArgs& a) {
  if (!a.tap.empty()) {
    auto p = net::TapPort::open(a.tap, static_cast<std::uint16_t>(a.queues));
    if (!p) prog.die_usage(p.error().message());
    return std::move(*p);
  }
  if (!a.af_packet.empty()) {
    auto p = net::AfPacketPort::open(a.af_packet, static_cast<std::uint16_t>(a.queues));
    if (!p) prog.die_usage(p.error().message());
    return std::move(*p);
  }
  return nullptr;  // loopback
}

}  // namespace

int main(int argc, char** argv) {
  cli::BackendProgram prog(
      "vhostkit-net", "net",
      "vhostkit-net: a vhost-user virtio-net backend. A QEMU guest or DPDK virtio-user connects "
      "to the socket and gets a NIC backed by a TAP device, an AF_PACKET interface or a "
      "loopback.");
  NetArgs a;
  add_net_options(prog.app(), a);
  if (auto done = prog.parse(argc, argv)) return *done;

  if (a.tap.empty() && a.af_packet.empty() && !a.loopback) {
    prog.die_usage("give one port: --tap=IF, --af-packet=IF or --loopback");
  }
  auto mac = cli::parse_mac(a.mac);
  if (!mac) prog.die_usage(mac.error().detail);
  cli::BackendConfig cfg = prog.check();

  // Before any thread starts, so that every thread inherits the blocked mask.
  prog.block_signals();

  net::NetOptions nopts;
  nopts.mac = *mac;
  nopts.mtu = static_cast<std::uint16_t>(a.mtu);
  nopts.queue_pairs = static_cast<std::uint16_t>(a.queues);
  nopts.burst = static_cast<std::uint16_t>(a.burst);
  nopts.packed = cfg.packed;
  nopts.in_order = cfg.in_order;
  nopts.port = open_port(prog, a);
  auto netdev = net::NetDevice::create(std::move(nopts));
  if (!netdev) prog.die_usage(netdev.error().message());
  net::NetDevice& dev = **netdev;

  // A pair's rx and tx rings share a worker; without --cpu, a worker per queue pair.
  const vhost::DeviceOptions dopts = cfg.device_options("net", 2, dev.queue_pairs());
  vhost::Device device(dev, dopts);

  vhost_user::ServerOptions sopts = std::move(cfg.server);
  sopts.session.name = "net";
  sopts.session.queue_num = dev.queue_pairs();  // QEMU compares it with its queue pairs
  sopts.session.send_rarp = [&dev](const vhost_user::Mac& m) -> Result<> {
    dev.announce(m.data());
    return {};
  };
  sopts.session.set_mtu = [](std::uint16_t mtu) -> Result<> {
    spdlog::info("frontend set MTU {}", mtu);
    return {};
  };

  // After the device (which it reads) and before serving; destroyed before the device.
  std::unique_ptr<cli::metrics::Server> metrics;
  if (cfg.metrics) {
    metrics = cli::metrics::start_or_report("vhostkit-net", prog.args().metrics, *cfg.metrics, [&] {
      cli::metrics::Snapshot s;
      cli::metrics::add_device(s, "net", device, {prog.connected(), prog.sessions()});
      cli::metrics::add_net(s, dev);
      return s;
    });
    if (!metrics) return cli::kExitBadArgs;
    spdlog::info("vhostkit-net: metrics at http://{}/metrics", prog.args().metrics);
  }

  const std::string port = dev.loopback()
                               ? std::string("loopback")
                               : fmt::format("{} {}", dev.port()->kind(), dev.port()->ifname());
  spdlog::info("vhostkit-net: {}, port {}, {} queue pair(s), poll {}, mac {}", cfg.where, port,
               dev.queue_pairs(), prog.args().poll, cli::format_mac(*mac));

  std::optional<cli::StatsPrinter> stats;
  if (cfg.stats_interval.count() > 0) {
    stats.emplace(dev, cfg.stats_interval, [](const std::string& line) {
      std::fprintf(stdout, "%s\n", line.c_str());
      std::fflush(stdout);
    });
  }
  const int rc = prog.serve(device, std::move(sopts));
  stats.reset();
  // What this process moved, for whoever reads the log after it is gone.
  for (std::uint16_t qp = 0; qp < dev.queue_pairs(); ++qp) {
    spdlog::info("vhostkit-net: totals {}", cli::format_pair_totals(qp, dev.stats(qp)));
  }
  return rc;
}

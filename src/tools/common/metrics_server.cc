#include "metrics_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

#include <fmt/format.h>
#include <httplib.h>

namespace vhostkit::cli::metrics {
namespace {

using Clock = std::chrono::steady_clock;

// Set while the accept thread closes a connection it could not queue: the connection's
// processing then only closes it.
thread_local bool tl_shed = false;

std::string peer_text(int sock, bool local, int& port) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  port = 0;
  const int r = local ? ::getsockname(sock, reinterpret_cast<sockaddr*>(&ss), &len)
                      : ::getpeername(sock, reinterpret_cast<sockaddr*>(&ss), &len);
  if (r != 0) return {};
  char buf[INET6_ADDRSTRLEN] = {};
  if (ss.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    ::inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    ::inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf);
    port = ntohs(a->sin6_port);
  }
  return buf;
}

// httplib's own socket stream times out per read only, so a client trickling bytes (slowloris)
// or sending header after header could hold a worker, and grow the request, without end. This
// one also stops at the connection's deadline, after its byte budget, and when the server stops.
class BoundedStream final : public httplib::Stream {
 public:
  BoundedStream(int sock, int stop_fd, Clock::time_point deadline, const Limits& l)
      : sock_(sock),
        stop_fd_(stop_fd),
        deadline_(deadline),
        limits_(l),
        budget_(l.bytes_per_connection) {}

  // Waits up to `timeout` (and the deadline) for the next request's first byte.
  bool wait_request(std::chrono::milliseconds timeout) const {
    return pos_ < len_ || wait(POLLIN, timeout);
  }

  bool is_readable() const override { return wait_request(limits_.io_timeout); }
  bool is_writable() const override { return wait(POLLOUT, limits_.io_timeout); }

  ssize_t read(char* ptr, size_t size) override {
    if (pos_ == len_) {
      if (budget_ == 0 || !wait(POLLIN, limits_.io_timeout)) return -1;
      const ssize_t n = ::recv(sock_, buf_, std::min(sizeof buf_, budget_), MSG_DONTWAIT);
      if (n <= 0) return n;
      budget_ -= static_cast<std::size_t>(n);
      pos_ = 0;
      len_ = static_cast<std::size_t>(n);
    }
    const std::size_t n = std::min(size, len_ - pos_);
    std::memcpy(ptr, buf_ + pos_, n);
    pos_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (!wait(POLLOUT, limits_.io_timeout)) return -1;
    return ::send(sock_, ptr, size, MSG_NOSIGNAL | MSG_DONTWAIT);
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    ip = peer_text(sock_, false, port);
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    ip = peer_text(sock_, true, port);
  }
  socket_t socket() const override { return sock_; }

 private:
  // False on timeout, at the deadline, on an error, or when the server stops.
  bool wait(short events, std::chrono::milliseconds timeout) const {
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now());
      const auto ms = std::min(timeout, left);
      if (ms.count() <= 0) return false;
      pollfd p[2] = {{sock_, events, 0}, {stop_fd_, POLLIN, 0}};
      const int n = ::poll(p, 2, static_cast<int>(ms.count()));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0 || p[1].revents != 0) return false;
      return (p[0].revents & (events | POLLHUP | POLLERR)) != 0;
    }
  }

  int sock_;
  int stop_fd_;
  Clock::time_point deadline_;
  const Limits& limits_;
  std::size_t budget_;
  char buf_[4096];
  std::size_t pos_ = 0;
  std::size_t len_ = 0;
};

// A fixed set of workers and a bounded queue. httplib's ThreadPool queues without a bound, one
// open socket per queued connection; here a connection that finds the queue full is closed at
// once on the accept thread (tl_shed), so a flood of connections costs accepts, not fds.
class BoundedPool final : public httplib::TaskQueue {
 public:
  BoundedPool(unsigned workers, unsigned queued, std::atomic<std::uint64_t>& shed)
      : cap_(queued), shed_(shed) {
    for (unsigned i = 0; i < workers; ++i) threads_.emplace_back([this] { run(); });
  }
  ~BoundedPool() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    {
      std::lock_guard lk(mu_);
      if (!stop_ && jobs_.size() < cap_) {
        jobs_.push_back(std::move(fn));
        cv_.notify_one();
        return;
      }
    }
    shed_.fetch_add(1, std::memory_order_relaxed);
    tl_shed = true;
    fn();
    tl_shed = false;
  }

  void shutdown() override {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [this] { return stop_ || !jobs_.empty(); });
        // Queued connections are still served (quickly: the server's stop ends their waits),
        // so that each is closed.
        if (jobs_.empty()) return;
        fn = std::move(jobs_.front());
        jobs_.pop_front();
      }
      fn();
    }
  }

  const std::size_t cap_;
  std::atomic<std::uint64_t>& shed_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// Why a bind failed: httplib says only that it did.
std::string bind_error(const HostPort& at) {
  sockaddr_storage ss{};
  socklen_t len = 0;
  int family = AF_INET;
  if (auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
      ::inet_pton(AF_INET6, at.host.c_str(), &a->sin6_addr) == 1) {
    family = a->sin6_family = AF_INET6;
    a->sin6_port = htons(at.port);
    len = sizeof *a;
  } else {
    auto* b = reinterpret_cast<sockaddr_in*>(&ss);
    ::inet_pton(AF_INET, at.host.c_str(), &b->sin_addr);
    b->sin_family = AF_INET;
    b->sin_port = htons(at.port);
    len = sizeof *b;
  }
  UniqueFd s(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s) return std::strerror(errno);
  const int one = 1;
  ::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(s.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) return std::strerror(errno);
  if (::listen(s.get(), 1) != 0) return std::strerror(errno);
  return "the address cannot be listened on";
}

}  // namespace

struct Server::Http final : httplib::Server {
  Http(Limits l, std::shared_ptr<metrics::Server::Counts> counts)
      : limits(l), counts(std::move(counts)), stop_fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

  // Replaces httplib's connection loop (same shape: keep-alive rounds of process_request) to
  // read through BoundedStream.
  bool process_and_close_socket(socket_t sock) override {
    bool ok = false;
    if (!tl_shed && !stopping.load(std::memory_order_relaxed)) {
      BoundedStream strm(sock, stop_fd.get(), Clock::now() + limits.deadline, limits);
      for (unsigned n = limits.requests_per_connection; n > 0; --n) {
        if (!strm.wait_request(limits.idle_timeout)) break;
        bool closed = false;
        ok = process_request(strm, n == 1, closed, {});
        if (!ok || closed) break;
      }
    }
    ::shutdown(sock, SHUT_RDWR);
    ::close(sock);
    counts->closed.fetch_add(1, std::memory_order_relaxed);
    return ok;
  }

  Limits limits;
  std::shared_ptr<metrics::Server::Counts> counts;
  UniqueFd stop_fd;  // readable once the server stops: ends every connection's waits
  std::atomic<bool> stopping{false};
};

Result<std::unique_ptr<Server>> Server::start(const HostPort& at, Source source, Limits limits) {
  std::unique_ptr<Server> s(new Server());
  s->counts_ = std::make_shared<Counts>();
  s->http_ = std::make_unique<Http>(limits, s->counts_);
  Http& h = *s->http_;
  if (!h.stop_fd) return fail_errno("eventfd for the metrics server");
  h.new_task_queue = [limits, counts = s->counts_] {
    return new BoundedPool(limits.workers, limits.queued, counts->shed);
  };
  h.set_payload_max_length(limits.bytes_per_connection);
  // httplib's default also sets SO_REUSEPORT, which lets a second process bind the same port
  // and take half the scrapes: a port in use must be an error instead.
  h.set_socket_options([](socket_t sock) {
    const int one = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  });
  h.set_pre_routing_handler([](const httplib::Request& req, httplib::Response& res) {
    if (req.method != "GET") {
      res.status = 405;
      res.set_header("Allow", "GET");
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  h.Get("/metrics", [source](const httplib::Request&, httplib::Response& res) {
    res.set_content(to_prometheus(source()), "text/plain; version=0.0.4; charset=utf-8");
  });
  h.Get("/stats", [source](const httplib::Request&, httplib::Response& res) {
    res.set_content(to_json(source()).dump() + "\n", "application/json");
  });
  if (!h.bind_to_port(at.host, at.port)) {
    return fail(Errc::invalid_argument,
                fmt::format("cannot listen on {}:{}: {}", at.host, at.port, bind_error(at)));
  }
  auto done = std::make_shared<std::atomic<bool>>(false);
  s->listener_ = std::thread([&h, done] {
    h.listen_after_bind();
    done->store(true, std::memory_order_release);
  });
  // httplib's stop() does nothing until the accept loop runs (0.11 has no wait_until_ready):
  // wait the moment it takes, so that the destructor's stop() is never lost.
  while (!h.is_running() && !done->load(std::memory_order_acquire)) std::this_thread::yield();
  return s;
}

std::unique_ptr<Server> start_or_report(std::string_view program, std::string_view text,
                                        const HostPort& at, Server::Source source) {
  auto s = Server::start(at, std::move(source));
  if (!s) {
    std::fprintf(stderr, "%.*s: --metrics=%.*s: %s\n", static_cast<int>(program.size()),
                 program.data(), static_cast<int>(text.size()), text.data(),
                 s.error().detail.c_str());
    return nullptr;
  }
  return std::move(*s);
}

Server::~Server() {
  if (!http_) return;
  http_->stopping.store(true, std::memory_order_relaxed);
  const std::uint64_t one = 1;
  (void)!::write(http_->stop_fd.get(), &one, sizeof one);
  http_->stop();
  if (listener_.joinable()) listener_.join();
}

}  // namespace vhostkit::cli::metrics

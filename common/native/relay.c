/*
 * pairgate's native relay: moves the bytes of spliced plain-TCP sessions between two sockets on
 * a thread of its own, so that a logged-in session costs the JavaScript event loop nothing until
 * it ends (Linux only: epoll).
 *
 * Why: past login a proxied IMAP/POP3 session is a byte relay, yet relayed in JavaScript every
 * command and every answer wakes the event loop, and on a machine whose cores are busy with the
 * mail store each of those wake-ups costs far more than the copy it does (bench/RESULTS.md,
 * proxy). Here a wake-up is an epoll_wait return and two system calls.
 *
 * Ownership: JavaScript keeps both sockets (their Node handles, their fds) for the whole session
 * and closes them. attach() lends the two fds to this thread; from then on Node neither reads
 * nor writes them. The thread gives them back when the session ends (a completion, delivered on
 * the JavaScript thread), or at once when JavaScript calls detach(). After either, this thread
 * never touches the fds again, so JavaScript may close them.
 *
 * Per direction: read into the thread's buffer, write on; what the destination does not take
 * is kept (malloc'd) and the source is not read again until it is written (backpressure: the
 * kernel's receive window then stops the sender). A FIN is passed on as shutdown(SHUT_WR) once
 * everything before it is written; the other direction keeps flowing (half-close).
 *
 * A session ends (completion) when:
 *   - both directions have seen their FIN and passed it on ("closed"; who closed first is kept);
 *   - the backend has closed and the client has not closed within grace_ms of being told;
 *   - a read or write fails ("error", with errno, and which side);
 *   - no byte moved either way for idle_ms ("idle"; the sockets are left open, for JavaScript to
 *     send the protocol's goodbye).
 *
 * Locking: one mutex guards the session table; the thread holds it while it handles one session's
 * event, and the JavaScript thread while it attaches, detaches or reads counters. The thread never
 * calls into JavaScript with it held.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_BYTES (128 * 1024)
#define MAX_EVENTS 256
/* Reads per direction per wake-up before the next session's turn (fairness under bulk load). */
#define READS_PER_TURN 8

enum { CLIENT = 0, BACKEND = 1 };
enum { END_NONE = 0, END_CLOSED = 1, END_ERROR = 2, END_IDLE = 3, END_GRACE = 4 };

typedef struct {
  char *pending;     /* bytes read and not yet written to the destination (malloc'd), or NULL */
  size_t pending_len;
  size_t pending_off;
  int eof;           /* the source sent its FIN */
  int shut;          /* ... and it was passed on (shutdown of the destination's write side) */
  double bytes;      /* bytes written to the destination */
} direction_t;

typedef struct {
  int in_use;
  uint32_t gen;
  int fd[2];            /* CLIENT, BACKEND */
  uint32_t interest[2]; /* epoll events registered per fd */
  uint8_t hup[2];       /* the fd reported EPOLLHUP (both FINs, or a reset): it does so on every epoll_wait */
  uint8_t off[2];       /* ... so, while nothing is wanted from it, it is off epoll (set_interest) */
  direction_t dir[2];   /* dir[CLIENT]: client -> backend; dir[BACKEND]: backend -> client */
  int64_t idle_ms, grace_ms;
  int64_t last_moved;   /* ms, monotonic */
  int64_t grace_until;  /* ms; 0 = not waiting for the client */
  int first_closed;     /* -1, CLIENT or BACKEND: whose FIN came first */
} session_t;

typedef struct {
  uint32_t id;
  int end, side, err;
  double bytes_in, bytes_out;
  int first_closed;
} completion_t;

typedef struct {
  pthread_mutex_t lock;
  pthread_t thread;
  int running, stopping;
  int epfd, evfd;
  session_t *slots;
  uint32_t nslots, live;
  uint32_t *free_list;
  uint32_t nfree;
  completion_t *done;
  uint32_t ndone, cap_done;
  int notify_pending;
  napi_threadsafe_function tsfn;
  napi_ref on_done;
  uint32_t refs; /* sessions attached (the JS thread's count: the tsfn is ref'd while > 0) */
  int test_hold_ms; /* tests only: the thread waits this long between epoll_wait and the lock */
  char buf[READ_BYTES];
} relay_t;

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* id = generation << 20 | slot: a stale id (a finished session's slot reused) never matches. */
#define SLOT_BITS 20
#define SLOT_MASK ((1u << SLOT_BITS) - 1)
static uint32_t make_id(uint32_t slot, uint32_t gen) { return (gen << SLOT_BITS) | slot; }

/* epoll's key for a session's fd: its generation too, so that an event the thread took before a
 * detach (taken out of epoll, but already returned by epoll_wait) is not applied to the next
 * session given the same slot. */
static uint64_t epoll_key(uint32_t slot, uint32_t gen, int side) {
  return ((uint64_t)gen << 32) | ((uint64_t)slot << 1) | (uint64_t)side;
}

static session_t *lookup(relay_t *r, uint32_t id) {
  uint32_t slot = id & SLOT_MASK;
  if (slot >= r->nslots) return NULL;
  session_t *s = &r->slots[slot];
  if (!s->in_use || make_id(slot, s->gen) != id) return NULL;
  return s;
}

static void set_interest(relay_t *r, session_t *s, uint32_t slot, int side, uint32_t ev) {
  /* epoll reports HUP whatever it is asked for: a hung-up fd nothing is wanted from (its bytes
   * wait for the other side to drain, and nothing is left to write to it) would wake this thread
   * on every epoll_wait, a spin. It leaves epoll until something is wanted from it again. */
  if (ev == 0 && s->hup[side]) {
    if (!s->off[side]) {
      epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->fd[side], NULL);
      s->off[side] = 1;
    }
    s->interest[side] = 0;
    return;
  }
  if (!s->off[side] && s->interest[side] == ev) return;
  struct epoll_event e = {.events = ev, .data = {.u64 = epoll_key(slot, s->gen, side)}};
  epoll_ctl(r->epfd, s->off[side] ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, s->fd[side], &e);
  s->off[side] = 0;
  s->interest[side] = ev;
}

/* Takes the session off epoll and out of the table; frees what it holds. Caller holds the lock. */
static void release(relay_t *r, session_t *s, uint32_t slot) {
  for (int side = 0; side < 2; side++) {
    if (!s->off[side]) epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->fd[side], NULL);
    free(s->dir[side].pending);
    s->dir[side].pending = NULL;
  }
  s->in_use = 0;
  s->gen = (s->gen + 1) & ((1u << (32 - SLOT_BITS)) - 1);
  r->free_list[r->nfree++] = slot;
  r->live--;
}

static void complete(relay_t *r, session_t *s, uint32_t slot, int end, int side, int err) {
  if (r->ndone == r->cap_done) {
    uint32_t cap = r->cap_done ? r->cap_done * 2 : 64;
    completion_t *d = realloc(r->done, cap * sizeof *d);
    if (!d) abort();
    r->done = d;
    r->cap_done = cap;
  }
  completion_t *c = &r->done[r->ndone++];
  c->id = make_id(slot, s->gen);
  c->end = end;
  c->side = side;
  c->err = err;
  c->bytes_in = s->dir[CLIENT].bytes;
  c->bytes_out = s->dir[BACKEND].bytes;
  c->first_closed = s->first_closed;
  release(r, s, slot);
}

/* Writes what is pending in direction d. Returns 1 when all of it is out, 0 when the destination is full, -errno on error. */
static int flush_pending(session_t *s, int d) {
  direction_t *dir = &s->dir[d];
  int dst = s->fd[d ^ 1];
  while (dir->pending) {
    ssize_t n = send(dst, dir->pending + dir->pending_off, dir->pending_len - dir->pending_off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return -errno;
    }
    dir->bytes += (double)n;
    dir->pending_off += (size_t)n;
    if (dir->pending_off == dir->pending_len) {
      free(dir->pending);
      dir->pending = NULL;
      dir->pending_len = dir->pending_off = 0;
    }
  }
  return 1;
}

/* Moves what direction d can move now. Returns 0, or -errno with *side set to the failing socket. */
static int pump(relay_t *r, session_t *s, int d, int *side, int64_t now) {
  direction_t *dir = &s->dir[d];
  int src = s->fd[d], dst = s->fd[d ^ 1];
  for (int turn = 0; turn < READS_PER_TURN; turn++) {
    int f = flush_pending(s, d);
    if (f < 0) { *side = d ^ 1; return f; }
    if (f == 0) return 0;
    if (dir->eof) {
      if (!dir->shut) {
        dir->shut = 1;
        /* ENOTCONN: the destination is gone already; its own direction reports it. */
        shutdown(dst, SHUT_WR);
      }
      return 0;
    }
    ssize_t n = recv(src, r->buf, READ_BYTES, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      *side = d;
      return -errno;
    }
    if (n == 0) {
      dir->eof = 1;
      if (s->first_closed < 0) s->first_closed = d;
      continue;
    }
    s->last_moved = now;
    ssize_t w = send(dst, r->buf, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) w = 0;
      else { *side = d ^ 1; return -errno; }
    }
    dir->bytes += (double)w;
    if (w < n) {
      dir->pending = malloc((size_t)(n - w));
      if (!dir->pending) { *side = d; return -ENOMEM; }
      memcpy(dir->pending, r->buf + w, (size_t)(n - w));
      dir->pending_len = (size_t)(n - w);
      dir->pending_off = 0;
      return 0;
    }
    if ((size_t)n < READ_BYTES) return 0; /* drained what was there (level-triggered epoll says if more comes) */
  }
  return 0;
}

/* Handles a wake-up for one session: both directions, then the end rules and epoll interest.
 * `woke` is the side whose fd reported `events` (epoll reports ERR and HUP whatever it was asked for). */
static void service(relay_t *r, uint32_t slot, int woke, uint32_t events, int64_t now) {
  session_t *s = &r->slots[slot];
  for (int d = 0; d < 2; d++) {
    int side = 0;
    int rc = pump(r, s, d, &side, now);
    if (rc < 0) {
      complete(r, s, slot, END_ERROR, side, -rc);
      return;
    }
  }
  /* An error on the socket, or a hang-up while we may still write to it (a reset): it cannot take
   * any more bytes, and a level-triggered HUP nobody reads would wake this thread for ever. */
  if ((events & EPOLLERR) || ((events & EPOLLHUP) && !s->dir[woke ^ 1].shut)) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(s->fd[woke], SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err == 0) err = ECONNRESET;
    complete(r, s, slot, END_ERROR, woke, err);
    return;
  }
  if (events & EPOLLHUP) s->hup[woke] = 1;
  direction_t *up = &s->dir[CLIENT], *down = &s->dir[BACKEND];
  if (up->shut && down->shut) {
    complete(r, s, slot, END_CLOSED, s->first_closed < 0 ? CLIENT : s->first_closed, 0);
    return;
  }
  if (down->shut && s->grace_until == 0) s->grace_until = now + s->grace_ms;
  /* A fd is read while its direction may read (no FIN yet, nothing pending), written while the
   * other direction has something pending for it. */
  for (int side = 0; side < 2; side++) {
    uint32_t ev = 0;
    if (!s->dir[side].eof && !s->dir[side].pending) ev |= EPOLLIN;
    if (s->dir[side ^ 1].pending) ev |= EPOLLOUT;
    set_interest(r, s, slot, side, ev);
  }
}

/* Once a second: idle sessions and clients that outstayed the grace after the backend closed. */
static void sweep(relay_t *r, int64_t now) {
  for (uint32_t slot = 0; slot < r->nslots; slot++) {
    session_t *s = &r->slots[slot];
    if (!s->in_use) continue;
    if (s->grace_until != 0 && now >= s->grace_until) complete(r, s, slot, END_GRACE, CLIENT, 0);
    else if (s->idle_ms > 0 && s->grace_until == 0 && now - s->last_moved >= s->idle_ms) complete(r, s, slot, END_IDLE, CLIENT, 0);
  }
}

static void *relay_main(void *arg) {
  relay_t *r = arg;
  struct epoll_event events[MAX_EVENTS];
  int64_t last_sweep = now_ms();
  for (;;) {
    int n = epoll_wait(r->epfd, events, MAX_EVENTS, 1000);
    int hold = __atomic_load_n(&r->test_hold_ms, __ATOMIC_RELAXED);
    if (hold > 0 && n > 0) {
      struct timespec ts = {.tv_sec = hold / 1000, .tv_nsec = (long)(hold % 1000) * 1000000L};
      nanosleep(&ts, NULL);
    }
    int64_t now = now_ms();
    /* The lock is taken per event, not per batch: JavaScript's attach, detach and counters wait
     * for one session's system calls at most, not for a whole batch's. */
    for (int i = 0; i < n; i++) {
      uint64_t key = events[i].data.u64;
      if (key == UINT64_MAX) {
        uint64_t v;
        ssize_t rd = read(r->evfd, &v, sizeof v);
        (void)rd;
        continue;
      }
      uint32_t slot = (uint32_t)(key & 0xffffffffu) >> 1;
      pthread_mutex_lock(&r->lock);
      /* Finished earlier in this batch, or detached (and the slot perhaps reused) since epoll_wait. */
      if (slot < r->nslots && r->slots[slot].in_use && r->slots[slot].gen == (uint32_t)(key >> 32)) service(r, slot, (int)(key & 1), events[i].events, now);
      pthread_mutex_unlock(&r->lock);
    }
    pthread_mutex_lock(&r->lock);
    if (r->stopping) {
      pthread_mutex_unlock(&r->lock);
      return NULL;
    }
    if (now - last_sweep >= 1000) {
      last_sweep = now;
      sweep(r, now);
    }
    int notify = r->ndone > 0 && !r->notify_pending;
    if (notify) r->notify_pending = 1;
    pthread_mutex_unlock(&r->lock);
    if (notify) napi_call_threadsafe_function(r->tsfn, NULL, napi_tsfn_nonblocking);
  }
}

/* ---- the JavaScript side -------------------------------------------------------------------- */

#define CHECK(call)                                                        \
  do {                                                                     \
    if ((call) != napi_ok) {                                               \
      napi_throw_error(env, "ERR_NATIVE_RELAY", "native relay: " #call);   \
      return NULL;                                                         \
    }                                                                      \
  } while (0)

static const char *END_NAMES[] = {"none", "closed", "error", "idle", "grace"};

/* Takes one queued completion (any: their order does not matter). Caller holds the lock. */
static int pop_done(relay_t *r, completion_t *out) {
  if (r->ndone == 0) return 0;
  *out = r->done[--r->ndone];
  return 1;
}

/* Takes the queued completion of session `id`, if it is queued. Caller holds the lock. */
static int take_done(relay_t *r, uint32_t id, completion_t *out) {
  for (uint32_t i = 0; i < r->ndone; i++) {
    if (r->done[i].id != id) continue;
    *out = r->done[i];
    r->done[i] = r->done[--r->ndone];
    return 1;
  }
  return 0;
}

/* Runs on the JavaScript thread: hands every finished session to the on_done callback. One at a
 * time from the shared queue, so that a callback that detaches another session finished in the
 * same batch finds it there (and gets its counts) instead of racing its delivery. */
static void deliver(napi_env env, napi_value js_cb, void *context, void *data) {
  (void)js_cb;
  (void)data;
  relay_t *r = context;
  if (!env) return;
  for (;;) {
    /* The scope first: a completion is taken off the queue only when it can be delivered. */
    napi_handle_scope scope;
    napi_value cb, global;
    int usable = napi_open_handle_scope(env, &scope) == napi_ok;
    if (usable && (napi_get_reference_value(env, r->on_done, &cb) != napi_ok || napi_get_global(env, &global) != napi_ok)) {
      napi_close_handle_scope(env, scope);
      usable = 0;
    }
    completion_t c;
    pthread_mutex_lock(&r->lock);
    int got = usable && pop_done(r, &c);
    /* Nothing left, or (at teardown) no way to call JavaScript: the next completion notifies anew. */
    if (!got) r->notify_pending = 0;
    pthread_mutex_unlock(&r->lock);
    if (!got) {
      if (usable) napi_close_handle_scope(env, scope);
      return;
    }
    napi_value argv[7];
    napi_create_uint32(env, c.id, &argv[0]);
    napi_create_string_utf8(env, END_NAMES[c.end], NAPI_AUTO_LENGTH, &argv[1]);
    napi_create_string_utf8(env, c.side == CLIENT ? "client" : "backend", NAPI_AUTO_LENGTH, &argv[2]);
    napi_create_int32(env, c.err, &argv[3]);
    napi_create_double(env, c.bytes_in, &argv[4]);
    napi_create_double(env, c.bytes_out, &argv[5]);
    if (c.first_closed < 0) napi_get_null(env, &argv[6]);
    else napi_create_string_utf8(env, c.first_closed == CLIENT ? "client" : "backend", NAPI_AUTO_LENGTH, &argv[6]);
    if (r->refs > 0 && --r->refs == 0) napi_unref_threadsafe_function(env, r->tsfn);
    napi_value result;
    napi_status st = napi_call_function(env, global, cb, 7, argv, &result);
    if (st == napi_pending_exception) {
      /* A throwing callback is a bug on the JS side: report it as an uncaught exception, go on. */
      napi_value exc;
      napi_get_and_clear_last_exception(env, &exc);
      napi_fatal_exception(env, exc);
    }
    napi_close_handle_scope(env, scope);
  }
}

/* Stops the thread; registered after the thread-safe function, so it runs before that is torn down. */
static void stop_thread(void *data) {
  relay_t *r = data;
  if (!r->running) return;
  pthread_mutex_lock(&r->lock);
  r->stopping = 1;
  pthread_mutex_unlock(&r->lock);
  uint64_t one = 1;
  ssize_t w = write(r->evfd, &one, sizeof one);
  (void)w;
  pthread_join(r->thread, NULL);
  r->running = 0;
}

static void finalize_relay(napi_env env, void *data, void *hint) {
  (void)hint;
  relay_t *r = data;
  napi_remove_env_cleanup_hook(env, stop_thread, r);
  stop_thread(r);
  /* Sessions still lent are simply dropped: their fds belong to Node, which closes them. */
  for (uint32_t i = 0; i < r->nslots; i++) {
    free(r->slots[i].dir[0].pending);
    free(r->slots[i].dir[1].pending);
  }
  close(r->epfd);
  close(r->evfd);
  free(r->slots);
  free(r->free_list);
  free(r->done);
  pthread_mutex_destroy(&r->lock);
  free(r);
}

static relay_t *get_relay(napi_env env) {
  relay_t *r = NULL;
  napi_get_instance_data(env, (void **)&r);
  return r;
}

/* start(onDone): starts the relay thread; onDone(id, end, side, errno, bytesIn, bytesOut, firstClosed). */
static napi_value js_start(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (get_relay(env)) {
    napi_throw_error(env, "ERR_NATIVE_RELAY", "native relay already started");
    return NULL;
  }
  napi_valuetype t;
  if (argc < 1 || napi_typeof(env, argv[0], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, NULL, "start(onDone): onDone must be a function");
    return NULL;
  }
  relay_t *r = calloc(1, sizeof *r);
  if (!r) {
    napi_throw_error(env, "ERR_NATIVE_RELAY", "out of memory");
    return NULL;
  }
  pthread_mutex_init(&r->lock, NULL);
  r->epfd = epoll_create1(EPOLL_CLOEXEC);
  r->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  struct epoll_event e = {.events = EPOLLIN, .data = {.u64 = UINT64_MAX}};
  if (r->epfd < 0 || r->evfd < 0 || epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->evfd, &e) != 0) {
    if (r->epfd >= 0) close(r->epfd);
    if (r->evfd >= 0) close(r->evfd);
    free(r);
    napi_throw_error(env, "ERR_NATIVE_RELAY", "native relay: epoll/eventfd unavailable");
    return NULL;
  }
  CHECK(napi_create_reference(env, argv[0], 1, &r->on_done));
  napi_value name;
  CHECK(napi_create_string_utf8(env, "pairgate-native-relay", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_threadsafe_function(env, NULL, NULL, name, 0, 1, NULL, NULL, r, deliver, &r->tsfn));
  CHECK(napi_unref_threadsafe_function(env, r->tsfn));
  if (pthread_create(&r->thread, NULL, relay_main, r) != 0) {
    napi_throw_error(env, "ERR_NATIVE_RELAY", "native relay: cannot start its thread");
    return NULL;
  }
  r->running = 1;
  CHECK(napi_add_env_cleanup_hook(env, stop_thread, r));
  CHECK(napi_set_instance_data(env, r, finalize_relay, NULL));
  return NULL;
}

/* attach(clientFd, backendFd, idleMs, graceMs) -> id */
static napi_value js_attach(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  relay_t *r = get_relay(env);
  if (!r) {
    napi_throw_error(env, "ERR_NATIVE_RELAY", "native relay not started");
    return NULL;
  }
  int32_t cfd = -1, bfd = -1;
  int64_t idle = 0, grace = 0;
  if (argc < 4 || napi_get_value_int32(env, argv[0], &cfd) != napi_ok || napi_get_value_int32(env, argv[1], &bfd) != napi_ok ||
      napi_get_value_int64(env, argv[2], &idle) != napi_ok || napi_get_value_int64(env, argv[3], &grace) != napi_ok || cfd < 0 || bfd < 0 || cfd == bfd) {
    napi_throw_type_error(env, NULL, "attach(clientFd, backendFd, idleMs, graceMs): two distinct fds and two numbers");
    return NULL;
  }
  pthread_mutex_lock(&r->lock);
  uint32_t slot;
  if (r->nfree) slot = r->free_list[--r->nfree];
  else {
    if (r->nslots == SLOT_MASK) {
      pthread_mutex_unlock(&r->lock);
      napi_throw_error(env, "ERR_NATIVE_RELAY", "native relay: too many sessions");
      return NULL;
    }
    uint32_t cap = r->nslots ? r->nslots * 2 : 256;
    if (cap > SLOT_MASK) cap = SLOT_MASK;
    session_t *slots = realloc(r->slots, cap * sizeof *slots);
    uint32_t *fl = slots ? realloc(r->free_list, cap * sizeof *fl) : NULL;
    if (!slots || !fl) {
      if (slots) r->slots = slots;
      pthread_mutex_unlock(&r->lock);
      napi_throw_error(env, "ERR_NATIVE_RELAY", "native relay: out of memory");
      return NULL;
    }
    memset(slots + r->nslots, 0, (cap - r->nslots) * sizeof *slots);
    r->slots = slots;
    r->free_list = fl;
    for (uint32_t i = cap; i > r->nslots + 1; i--) r->free_list[r->nfree++] = i - 1;
    slot = r->nslots;
    r->nslots = cap;
  }
  session_t *s = &r->slots[slot];
  uint32_t gen = s->gen;
  memset(s, 0, sizeof *s);
  s->gen = gen;
  s->in_use = 1;
  s->fd[CLIENT] = cfd;
  s->fd[BACKEND] = bfd;
  s->idle_ms = idle;
  s->grace_ms = grace;
  s->last_moved = now_ms();
  s->first_closed = -1;
  int ok = 1;
  for (int side = 0; side < 2 && ok; side++) {
    struct epoll_event e = {.events = EPOLLIN, .data = {.u64 = epoll_key(slot, s->gen, side)}};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, s->fd[side], &e) != 0) {
      ok = 0;
      if (side == 1) epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->fd[0], NULL);
    }
    s->interest[side] = EPOLLIN;
  }
  if (!ok) {
    int err = errno;
    s->in_use = 0;
    r->free_list[r->nfree++] = slot;
    pthread_mutex_unlock(&r->lock);
    char msg[96];
    snprintf(msg, sizeof msg, "native relay: epoll_ctl failed (%s)", strerror(err));
    napi_throw_error(env, "ERR_NATIVE_RELAY", msg);
    return NULL;
  }
  r->live++;
  uint32_t id = make_id(slot, s->gen);
  pthread_mutex_unlock(&r->lock);
  if (r->refs++ == 0) napi_ref_threadsafe_function(env, r->tsfn);
  napi_value out;
  CHECK(napi_create_uint32(env, id, &out));
  return out;
}

static napi_value counts_array(napi_env env, double in, double out, napi_value unsent) {
  napi_value arr, v;
  napi_create_array_with_length(env, 3, &arr);
  napi_create_double(env, in, &v);
  napi_set_element(env, arr, 0, v);
  napi_create_double(env, out, &v);
  napi_set_element(env, arr, 1, v);
  napi_set_element(env, arr, 2, unsent);
  return arr;
}

/* [bytesIn, bytesOut, unsent] of a session; with `take`, the session is given back (detach). Null if unknown. */
static napi_value counters_of(napi_env env, relay_t *r, uint32_t id, int take) {
  pthread_mutex_lock(&r->lock);
  session_t *s = lookup(r, id);
  napi_value unsent;
  napi_get_null(env, &unsent);
  if (!s) {
    /* Finished on the relay thread, its completion not yet delivered: detach takes that instead. */
    completion_t c;
    int queued = take && take_done(r, id, &c);
    pthread_mutex_unlock(&r->lock);
    if (!queued) return unsent;
    if (r->refs > 0 && --r->refs == 0) napi_unref_threadsafe_function(env, r->tsfn);
    return counts_array(env, c.bytes_in, c.bytes_out, unsent);
  }
  double in = s->dir[CLIENT].bytes, out = s->dir[BACKEND].bytes;
  if (take) {
    /* What the backend sent that the client's socket had no room for yet: JavaScript writes it. */
    direction_t *down = &s->dir[BACKEND];
    if (down->pending) napi_create_buffer_copy(env, down->pending_len - down->pending_off, down->pending + down->pending_off, NULL, &unsent);
    release(r, s, id & SLOT_MASK);
  }
  pthread_mutex_unlock(&r->lock);
  if (take && r->refs > 0 && --r->refs == 0) napi_unref_threadsafe_function(env, r->tsfn);
  return counts_array(env, in, out, unsent);
}

static napi_value id_call(napi_env env, napi_callback_info info, int take) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  relay_t *r = get_relay(env);
  uint32_t id;
  if (!r || argc < 1 || napi_get_value_uint32(env, argv[0], &id) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected a session id of a started relay");
    return NULL;
  }
  return counters_of(env, r, id, take);
}

/* detach(id) -> [bytesIn, bytesOut, unsentToClient: Buffer | null] | null: the fds are JavaScript's again at once;
 * a session that had just finished is detached too (its completion dropped). Null: not lent (any more). */
static napi_value js_detach(napi_env env, napi_callback_info info) { return id_call(env, info, 1); }
/* counters(id) -> [bytesIn, bytesOut, null] | null */
static napi_value js_counters(napi_env env, napi_callback_info info) { return id_call(env, info, 0); }

/* live() -> sessions attached now */
static napi_value js_live(napi_env env, napi_callback_info info) {
  (void)info;
  relay_t *r = get_relay(env);
  uint32_t n = 0;
  if (r) {
    pthread_mutex_lock(&r->lock);
    n = r->live;
    pthread_mutex_unlock(&r->lock);
  }
  napi_value out;
  CHECK(napi_create_uint32(env, n, &out));
  return out;
}

/* testHold(ms): tests only; the relay thread waits ms between an epoll_wait that returned events and
 * taking the lock (the window in which JavaScript can detach and attach meanwhile). */
static napi_value js_test_hold(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  relay_t *r = get_relay(env);
  int32_t ms = 0;
  if (!r || argc < 1 || napi_get_value_int32(env, argv[0], &ms) != napi_ok) {
    napi_throw_type_error(env, NULL, "testHold(ms) of a started relay");
    return NULL;
  }
  __atomic_store_n(&r->test_hold_ms, ms < 0 ? 0 : ms, __ATOMIC_RELAXED);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"start", NULL, js_start, NULL, NULL, NULL, napi_default, NULL},
      {"attach", NULL, js_attach, NULL, NULL, NULL, napi_default, NULL},
      {"detach", NULL, js_detach, NULL, NULL, NULL, napi_default, NULL},
      {"counters", NULL, js_counters, NULL, NULL, NULL, napi_default, NULL},
      {"live", NULL, js_live, NULL, NULL, NULL, napi_default, NULL},
      {"testHold", NULL, js_test_hold, NULL, NULL, NULL, napi_default, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)

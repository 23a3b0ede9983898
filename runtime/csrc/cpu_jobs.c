/* moe-pack CPU jobs: moepack_expert calls run on one background thread of this library.
 *
 * Why: the hybrid engine's split layer waits for its CPU part (~1 ms), which used to start
 * only after the engine's Python had issued the layer's copies and launches (~60-120 us).
 * A Python thread cannot start it sooner: it needs the GIL for the Python around the call,
 * and the engine's thread holds the GIL while it issues that work. This thread needs no GIL:
 * moepack_job_submit hands it a job and returns at once; moepack_job_wait blocks (ctypes
 * releases the GIL while it does) until the job is done. One thread, always the same: OpenMP
 * makes one thread team per thread that opens a parallel region, and this one is reused.
 *
 * The job struct lives in the caller's memory (a ctypes Structure) until its wait returns.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, getpid under -std=c11 */
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

int moepack_expert(const uint8_t *record, const int64_t *desc, const float *x, int64_t T, float *h, float *y,
                   int threads);

typedef struct {
    const uint8_t *record;
    const int64_t *desc;
    const float *x;
    int64_t T;
    float *h;
    float *y;
    int32_t threads;
    int32_t rc;     /* moepack_expert's return code, once done */
    int32_t state;  /* 0 queued, 1 running, 2 done */
    int32_t pad;
    double seconds; /* the call's own time, not the queue's */
} mp_job;

#define MP_QUEUE 64
#define MP_BUSY 3 /* the queue is full: the caller runs the job itself */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queued = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;
static mp_job *queue[MP_QUEUE];
static int head, count;
static pid_t owner; /* the process whose thread serves the queue (0: none yet) */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *serve(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (count == 0) pthread_cond_wait(&queued, &mu);
        mp_job *j = queue[head];
        head = (head + 1) % MP_QUEUE;
        count--;
        j->state = 1;
        pthread_mutex_unlock(&mu);
        const double t = now();
        const int rc = moepack_expert(j->record, j->desc, j->x, j->T, j->h, j->y, j->threads);
        const double dt = now() - t;
        pthread_mutex_lock(&mu);
        j->rc = rc;
        j->seconds = dt;
        j->state = 2;
        pthread_cond_broadcast(&finished);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

/* fork() copies the mutex in whatever state this process's threads leave it: hold it across
 * the fork, so it is in no thread's hands. The child starts afresh: a new mutex, and new
 * condition variables, since the copies still count the parent's server thread among their
 * waiters (a signal to one would go to a thread the child does not have: its second job hung).
 * Jobs queued or running at the fork belong to the parent; the child starts its own server. */
static void fork_prepare(void) { pthread_mutex_lock(&mu); }
static void fork_parent(void) { pthread_mutex_unlock(&mu); }
static void fork_child(void) {
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&queued, NULL);
    pthread_cond_init(&finished, NULL);
}

/* Queue `j` (state, rc and seconds are set here). 0: queued; MP_BUSY: the queue is full or no
 * thread could be started (the caller runs moepack_expert itself). After a fork the child has
 * no server thread: the first submit there starts one, with an empty queue. */
int moepack_job_submit(mp_job *j) {
    pthread_mutex_lock(&mu);
    if (owner != getpid()) {
        static int hooked;
        if (!hooked && pthread_atfork(fork_prepare, fork_parent, fork_child) == 0) hooked = 1;
        pthread_t t;
        pthread_attr_t attr;
        head = count = 0;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, serve, NULL);
        pthread_attr_destroy(&attr);
        if (failed) {
            pthread_mutex_unlock(&mu);
            return MP_BUSY;
        }
        owner = getpid();
    }
    if (count == MP_QUEUE) {
        pthread_mutex_unlock(&mu);
        return MP_BUSY;
    }
    j->state = 0;
    j->rc = -1;
    j->seconds = 0.0;
    queue[(head + count) % MP_QUEUE] = j;
    count++;
    pthread_cond_signal(&queued);
    pthread_mutex_unlock(&mu);
    return 0;
}

/* Block until `j` is done: its moepack_expert return code. */
int moepack_job_wait(mp_job *j) {
    pthread_mutex_lock(&mu);
    while (j->state != 2) pthread_cond_wait(&finished, &mu);
    const int rc = j->rc;
    pthread_mutex_unlock(&mu);
    return rc;
}

/* Two 16-token blocks whose OLD prefix-cache keys collide (the key before SHA-256 keys).
 *
 * The old key of a block was Python's hash((parent, tuple(tokens))). CPython's tuple hash
 * (xxHash-like: acc = rotl31(acc + lane * P2) * P1 per item) is a bijection of its state for each
 * item, and hash(n) == n for small non-negative ints, so two token tuples with the same inner
 * tuple hash give the same key for any parent. This searches for a full 64-bit collision among
 * blocks of 8 fixed tokens followed by 8 tokens in [0, 256) (valid ids for any vocabulary),
 * with Pollard's rho and distinguished points: about 2^32 evaluations, seconds to minutes.
 *
 *   gcc -O3 -march=native -o old_key_collision old_key_collision.c -lpthread && ./old_key_collision
 *
 * It prints two 64-bit states; the block of state x is FIXED + [(x >> 8*i) & 0xff for i < 8].
 * tests/test_prefix_cache_keys.py holds the pair found on 2026-11-30 and checks it with hash().
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#define P1 11400714785074694791ULL
#define P2 14029467366897019727ULL
#define P5 2870177450012600261ULL
#define ROT(x) (((x) << 31) | ((x) >> 33))
#define DPB 22
#define NT 2
#define LANES 4
static const uint64_t FIXED[8] = {17, 42, 101, 7, 250, 3, 64, 199};
static uint64_t ACC8;
static inline uint64_t f(uint64_t x) {
  uint64_t acc = ACC8;
  for (int i = 0; i < 8; i++) {
    uint64_t lane = (x >> (8 * i)) & 0xff;
    acc += lane * P2; acc = ROT(acc); acc *= P1;
  }
  return acc;
}
#define TABSZ (1 << 20)
typedef struct { uint64_t dp, start, len; int used; } Ent;
static Ent tab[TABSZ];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static volatile int done = 0;
static void resolve(uint64_t a, uint64_t la, uint64_t b, uint64_t lb) {
  while (la > lb) { a = f(a); la--; }
  while (lb > la) { b = f(b); lb--; }
  if (a == b) return; /* same chain (Robin Hood) */
  for (;;) {
    uint64_t fa = f(a), fb = f(b);
    if (fa == fb) {
      printf("COLLISION %llu %llu -> %llu\n", (unsigned long long)a, (unsigned long long)b,
             (unsigned long long)fa);
      fflush(stdout); done = 1; return;
    }
    a = fa; b = fb;
  }
}
static void *worker(void *arg) {
  uint64_t seed = 0x9E3779B97F4A7C15ULL * (1 + (uintptr_t)arg);
  uint64_t start[LANES], cur[LANES], len[LANES];
  for (int l = 0; l < LANES; l++) { seed = seed * 6364136223846793005ULL + 1442695040888963407ULL; start[l] = cur[l] = seed; len[l] = 0; }
  uint64_t n = 0;
  while (!done) {
    for (int l = 0; l < LANES; l++) { cur[l] = f(cur[l]); len[l]++; }
    n += LANES;
    for (int l = 0; l < LANES; l++) {
      if ((cur[l] & ((1ULL << DPB) - 1)) == 0 || len[l] > (40ULL << DPB)) {
        if (len[l] <= (40ULL << DPB)) {
          pthread_mutex_lock(&mu);
          uint64_t h = (cur[l] >> DPB) & (TABSZ - 1);
          while (tab[h].used && tab[h].dp != cur[l]) h = (h + 1) & (TABSZ - 1);
          if (tab[h].used) {
            uint64_t s2 = tab[h].start, l2 = tab[h].len;
            pthread_mutex_unlock(&mu);
            if (s2 != start[l]) resolve(start[l], len[l], s2, l2);
          } else { tab[h] = (Ent){cur[l], start[l], len[l], 1}; pthread_mutex_unlock(&mu); }
        }
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        start[l] = cur[l] = seed; len[l] = 0;
      }
    }
    if ((n & ((1ULL << 30) - 1)) < LANES && arg == 0) { fprintf(stderr, "%llu Gevals/thread\n", (unsigned long long)(n >> 30)); }
  }
  return NULL;
}
int main(void) {
  uint64_t acc = P5;
  for (int i = 0; i < 8; i++) { acc += FIXED[i] * P2; acc = ROT(acc); acc *= P1; }
  ACC8 = acc;
  pthread_t t[NT];
  for (uintptr_t i = 0; i < NT; i++) pthread_create(&t[i], NULL, worker, (void *)i);
  for (int i = 0; i < NT; i++) pthread_join(t[i], NULL);
  return 0;
}

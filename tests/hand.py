"""Reference computations written out by hand (plain Python and math, no torch), shared by the
tests that check the product's losses against them."""

from __future__ import annotations

import math


def softmax(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    """KL(p || q) = sum_c p_c log(p_c / q_c), terms with p_c = 0 left out."""
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def pixel_rows(logits):
    """[N,C,H,W] -> one class-score row per pixel, in (n, h, w) order."""
    n, c, h, w = logits.shape
    return [[float(logits[i, k, y, x]) for k in range(c)] for i in range(n) for y in range(h) for x in range(w)]


def hand_attention(feature, p=2.0):
    """feature: nested list [C][H][W] -> normalised list of H*W values of mean_c |f|^p."""
    c_n, h_n, w_n = len(feature), len(feature[0]), len(feature[0][0])
    q = [sum(abs(feature[c][h][w]) ** p for c in range(c_n)) / c_n for h in range(h_n) for w in range(w_n)]
    norm = math.sqrt(sum(v * v for v in q))
    return [v / norm for v in q]


def hand_at_loss(student_batch, teacher_batch, p=2.0):
    """Mean over samples and positions of (Q_s - Q_t)^2."""
    total, count = 0.0, 0
    for s, t in zip(student_batch, teacher_batch):
        for a, b in zip(hand_attention(s, p), hand_attention(t, p)):
            total += (a - b) ** 2
            count += 1
    return total / count


def hand_kd4mtl(student, teacher):
    """Mean over samples and pixels of sum_c (s/||s|| - t/||t||)^2, norms over channels."""
    total, count = 0.0, 0
    for s, t in zip(student, teacher):
        c_n, h_n, w_n = len(s), len(s[0]), len(s[0][0])
        for h in range(h_n):
            for w in range(w_n):
                s_vec = [s[c][h][w] for c in range(c_n)]
                t_vec = [t[c][h][w] for c in range(c_n)]
                s_norm = math.sqrt(sum(v * v for v in s_vec))
                t_norm = math.sqrt(sum(v * v for v in t_vec))
                total += sum((a / s_norm - b / t_norm) ** 2 for a, b in zip(s_vec, t_vec))
                count += 1
    return total / count

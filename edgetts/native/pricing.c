/* A mean budget per answer, held by moving the price (edgetts.runtime.pricing.MeanBudget, in the
 * same floating-point operations, with the constants build-c writes from it).
 *
 * After each answer the recent mean cost (exponentially weighted over about ETT_PRICE_WINDOW
 * answers) is compared with the budget: the log-price moves by the relative error, clipped to
 * +-ETT_PRICE_STEP, so above the budget the price rises (cheaper points win), below it falls, and
 * at a steady load the step goes to zero.  A price below ETT_PRICE_FLOOR is 0 (the most accurate
 * point that fits); a price at 0 that must rise starts from the floor; it never passes
 * ETT_PRICE_CEILING times the price from which the cheapest point wins, so a budget that nothing
 * meets leaves a price that comes back as soon as it can be met.
 */
#include <math.h>

#include "internal.h"

/* The cost a point is priced at: its profiled energy with joules, else its latency (-1: unknown). */
static double point_cost(const edgetts_point_info *p, int joules)
{
    return joules ? p->energy_j : p->latency_ms;
}

double ett_cheapest_price(int joules)
{
    int cheapest = -1;
    for (int i = 0; i < ett_n_frontier; i++) { /* the least cost, the most accurate among equals */
        const edgetts_point_info *p = &ett_frontier[i].info;
        double c = point_cost(p, joules);
        if (c >= 0 && (cheapest < 0 || c < point_cost(&ett_frontier[cheapest].info, joules)
                       || (c == point_cost(&ett_frontier[cheapest].info, joules)
                           && p->accuracy > ett_frontier[cheapest].info.accuracy))) {
            cheapest = i;
        }
    }
    if (cheapest < 0) {
        return 0.0;
    }
    double c0 = point_cost(&ett_frontier[cheapest].info, joules), a0 = ett_frontier[cheapest].info.accuracy;
    double best = 0.0;
    int any = 0;
    for (int i = 0; i < ett_n_frontier; i++) {
        const edgetts_point_info *p = &ett_frontier[i].info;
        double c = point_cost(p, joules);
        if (c >= 0 && c > c0 && p->accuracy > a0) {
            double r = (p->accuracy - a0) / (c - c0);
            best = !any || r > best ? r : best;
            any = 1;
        }
    }
    return best;
}

edgetts_status ett_budget_start(ett_budget *b, double budget, int joules)
{
    if (!(budget >= 0) || isinf(budget)) {
        return EDGETTS_E_ARGUMENT;
    }
    if (joules && budget > 0) {
        for (int i = 0; i < ett_n_frontier; i++) {
            double e = ett_frontier[i].info.energy_j;
            if (!(e > 0) || isinf(e)) {
                return EDGETTS_E_ARGUMENT;
            }
        }
    }
    b->budget = budget;
    b->joules = budget > 0 && joules;
    b->has_mean = 0;
    b->mean = 0.0;
    b->ceiling = ETT_PRICE_CEILING * ett_cheapest_price(b->joules);
    return EDGETTS_OK;
}

double ett_budget_observe(ett_budget *b, double cost, double price)
{
    if (!(b->budget > 0) || !(cost >= 0) || isinf(cost)) {
        return price; /* no budget, or a cost that was not measured: nothing moves */
    }
    double keep = 1.0 - 1.0 / (ETT_PRICE_WINDOW > 1 ? ETT_PRICE_WINDOW : 1);
    b->mean = b->has_mean ? keep * b->mean + (1 - keep) * cost : cost;
    b->has_mean = 1;
    double error = fmax(-1.0, fmin(1.0, b->mean / b->budget - 1.0));
    double step = fmax(-ETT_PRICE_STEP, fmin(ETT_PRICE_STEP, 1.0 * error));
    if (price == 0.0) {
        return error > 0 ? ETT_PRICE_FLOOR : 0.0;
    }
    price = fmin(price * exp(step), fmax(b->ceiling, ETT_PRICE_FLOOR));
    return price < ETT_PRICE_FLOOR ? 0.0 : price;
}

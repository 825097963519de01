// SPDX-License-Identifier: GPL-2.0
/*
 * ipsec-nic: PCI probe, netdev, TX/RX rings, MSI-X + NAPI, link, ethtool.
 *
 * The bring-up follows the card's datasheet section 4.1 (the same steps as the
 * user-space reference driver guest_tools/driver.py). One TX and one RX queue
 * share MSI-X vector 1 (the card's reset IVAR map); vector 0 carries the admin,
 * link, error and SaDeleteReq causes.
 */
#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/dma-mapping.h>
#include <linux/etherdevice.h>
#include <linux/ethtool.h>
#include <linux/if_vlan.h>
#include <linux/module.h>
#include <net/netdev_queues.h>

#include "ipsec_nic.h"

static const struct pci_device_id ipnc_pci_tbl[] = {
	{ PCI_DEVICE(IPNC_VENDOR_ID, IPNC_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, ipnc_pci_tbl);

static struct dentry *ipnc_debugfs_root;

#define IPNC_QUEUE_CAUSES	(IPNC_CAUSE_TX0 | IPNC_CAUSE_RX0)
#define IPNC_MISC_CAUSES	(IPNC_CAUSE_LINK | IPNC_CAUSE_ERROR | IPNC_CAUSE_SA_DELETE_REQ)

u64 ipnc_rd64(struct ipnc_adapter *a, u32 reg)
{
	u32 lo = ipnc_rd(a, reg);	/* reading LO latches HI */

	return ((u64)ipnc_rd(a, reg + 4) << 32) | lo;
}

/* ---------------------------------------------------------------------- */
/* link */

static void ipnc_update_link(struct ipnc_adapter *a)
{
	bool up = ipnc_rd(a, IPNC_REG_STATUS) & IPNC_STATUS_LINK_UP;

	if (up && !netif_carrier_ok(a->netdev)) {
		netif_carrier_on(a->netdev);
		netdev_info(a->netdev, "link up\n");
	} else if (!up && netif_carrier_ok(a->netdev)) {
		netif_carrier_off(a->netdev);
		netdev_info(a->netdev, "link down\n");
	}
}

static void ipnc_link_work(struct work_struct *work)
{
	struct ipnc_adapter *a = container_of(work, struct ipnc_adapter, link_work);

	rtnl_lock();
	if (netif_running(a->netdev))
		ipnc_update_link(a);
	rtnl_unlock();
}

/* ---------------------------------------------------------------------- */
/* interrupts */

static irqreturn_t ipnc_misc_irq(int irq, void *data)
{
	struct ipnc_adapter *a = data;
	u32 icr = ipnc_rd(a, IPNC_REG_ICR) & IPNC_MISC_CAUSES;

	if (!icr)
		return IRQ_NONE;
	ipnc_wr(a, IPNC_REG_ICR, icr);	/* W1C: acknowledge to hear of it again */
	if (icr & IPNC_CAUSE_LINK)
		schedule_work(&a->link_work);
	if (icr & IPNC_CAUSE_ERROR)
		netdev_warn_once(a->netdev, "card error: ERR_CODE %u ERR_INFO %#x\n",
				 ipnc_rd(a, IPNC_REG_ERR_CODE), ipnc_rd(a, IPNC_REG_ERR_INFO));
	if (icr & IPNC_CAUSE_SA_DELETE_REQ)
		ipnc_ipsec_sa_delete_req(a);
	return IRQ_HANDLED;
}

/*
 * The card sends a message only when a cause newly latches in ICR (datasheet
 * section 8), so while TX0/RX0 stay latched it stays quiet: the queue causes
 * are acknowledged once, when NAPI completes, instead of masked and unmasked
 * around every poll (each BAR0 write is a round trip to the emulated card).
 */
static irqreturn_t ipnc_queue_irq(int irq, void *data)
{
	struct ipnc_adapter *a = data;

	a->sw.queue_irqs++;
	napi_schedule_irqoff(&a->napi);
	return IRQ_HANDLED;
}

/* ---------------------------------------------------------------------- */
/* TX */

/* Frames are linear (no NETIF_F_SG): one descriptor each. */
#define IPNC_TX_WAKE_THRESH(a)	((a)->tx_count / 4)

static u32 ipnc_tx_free(struct ipnc_adapter *a)
{
	return a->tx_count - 1 - ((a->tx_next_use - a->tx_next_clean) & (a->tx_count - 1));
}

/* One TAIL write covers every descriptor queued since the last one. */
static void ipnc_tx_kick(struct ipnc_adapter *a)
{
	if (a->tx_tail == a->tx_next_use)
		return;
	dma_wmb();
	ipnc_wr(a, IPNC_TXQ(0, IPNC_QREG_TAIL), a->tx_next_use);
	a->tx_tail = a->tx_next_use;
	a->sw.tx_doorbells++;
}

static void ipnc_clean_tx(struct ipnc_adapter *a, int budget)
{
	struct net_device *nd = a->netdev;
	struct netdev_queue *txq = netdev_get_tx_queue(nd, 0);
	unsigned int pkts = 0, bytes = 0, bql_bytes = 0, done = 0;

	while (a->tx_next_clean != a->tx_next_use) {
		struct ipnc_tx_desc *d = &a->tx_ring[a->tx_next_clean];
		struct ipnc_tx_slot *s = &a->tx_slots[a->tx_next_clean];
		u16 status;

		if (!(le16_to_cpu(READ_ONCE(d->wb_flags)) & IPNC_TX_WB_FLAGS_DONE))
			break;
		dma_rmb();
		status = le16_to_cpu(d->wb_status);
		dma_unmap_single(&a->pdev->dev, s->dma, s->len, DMA_TO_DEVICE);
		bql_bytes += s->len;
		a->sw.tx_status[min_t(u16, status, IPNC_TX_STATUS_BAD_DESCRIPTOR)]++;
		if (status == IPNC_TX_STATUS_OK) {
			pkts++;
			bytes += s->len;
			/* counted only once the card says it offloaded the frame */
			if (s->sa_handle)
				ipnc_ipsec_tx_done(a, s->sa_handle, s->sa_bytes);
		} else {
			nd->stats.tx_errors++;
		}
		napi_consume_skb(s->skb, budget);
		s->skb = NULL;
		done++;
		a->tx_next_clean = (a->tx_next_clean + 1) & (a->tx_count - 1);
	}
	nd->stats.tx_packets += pkts;
	nd->stats.tx_bytes += bytes;
	/* BQL counts every reclaimed descriptor, sent or refused, as ipnc_xmit queued it */
	netif_txq_completed_wake(txq, done, bql_bytes, ipnc_tx_free(a), IPNC_TX_WAKE_THRESH(a));
}

/*
 * The stack tells us (netdev_xmit_more()) when another frame follows at once;
 * TAIL is written only for the last one of such a burst, or when the queue
 * stops (__netdev_tx_sent_queue: BQL or a full ring). BQL stopping the queue
 * is what makes bursts: the qdisc then holds the frames and hands them over
 * in bulk when TX completions restart it.
 */
static netdev_tx_t ipnc_xmit(struct sk_buff *skb, struct net_device *nd)
{
	struct ipnc_adapter *a = netdev_priv(nd);
	struct netdev_queue *txq = netdev_get_tx_queue(nd, 0);
	struct ipnc_tx_desc *d;
	struct ipnc_tx_slot *s;
	dma_addr_t dma;
	u32 i = a->tx_next_use;

	if (unlikely(!ipnc_tx_free(a))) {
		/* not reached while the stop below works; never strand queued frames */
		netif_tx_stop_queue(txq);
		ipnc_tx_kick(a);
		a->sw.tx_busy++;
		return NETDEV_TX_BUSY;
	}
	/* No NETIF_F_SG: the stack hands us linear frames. */
	if (skb_linearize(skb))
		goto drop;
	d = &a->tx_ring[i];
	s = &a->tx_slots[i];
	memset(d, 0, sizeof(*d));
	if (xfrm_offload(skb)) {
		if (!ipnc_ipsec_tx(a, skb, d))
			goto drop;
	} else if (!list_empty(&a->policies)) {
		bool ok;

		rcu_read_lock();
		ok = ipnc_ipsec_tx_plain(a, skb, d);
		rcu_read_unlock();
		if (!ok)
			goto drop;
	}
	dma = dma_map_single(&a->pdev->dev, skb->data, skb->len, DMA_TO_DEVICE);
	if (dma_mapping_error(&a->pdev->dev, dma))
		goto drop;
	s->skb = skb;
	s->dma = dma;
	s->len = skb->len;
	s->sa_handle = le32_to_cpu(d->offload_handle);
	s->sa_bytes = skb->len - skb_network_offset(skb);
	d->addr = cpu_to_le64(dma);
	d->length = cpu_to_le16(skb->len);
	d->flags |= cpu_to_le16(IPNC_TX_FLAGS_EOP | IPNC_TX_FLAGS_REPORT_STATUS);
	skb_tx_timestamp(skb);
	a->tx_next_use = (i + 1) & (a->tx_count - 1);
	/* stop before the BQL call, so a full ring also forces the doorbell */
	netif_txq_maybe_stop(txq, ipnc_tx_free(a), 1, IPNC_TX_WAKE_THRESH(a));
	if (__netdev_tx_sent_queue(txq, s->len, netdev_xmit_more()))
		ipnc_tx_kick(a);
	return NETDEV_TX_OK;
drop:
	nd->stats.tx_dropped++;
	dev_kfree_skb_any(skb);
	/* the frames queued before this one may still wait for their doorbell */
	if (!netdev_xmit_more() || netif_xmit_stopped(txq))
		ipnc_tx_kick(a);
	return NETDEV_TX_OK;
}

/* ---------------------------------------------------------------------- */
/* RX */

static void ipnc_arm_rx(struct ipnc_adapter *a, u32 i)
{
	struct ipnc_rx_desc *d = &a->rx_ring[i];

	memset(d, 0, sizeof(*d));
	d->addr = cpu_to_le64(a->rx_slots[i].dma);
	d->buf_len = cpu_to_le16(a->rx_buf_len);
}

static int ipnc_alloc_rx_buf(struct ipnc_adapter *a, u32 i, gfp_t gfp)
{
	struct ipnc_rx_slot *s = &a->rx_slots[i];
	struct sk_buff *skb;
	dma_addr_t dma;

	skb = __netdev_alloc_skb_ip_align(a->netdev, a->rx_buf_len, gfp);
	if (!skb)
		return -ENOMEM;
	dma = dma_map_single(&a->pdev->dev, skb->data, a->rx_buf_len, DMA_FROM_DEVICE);
	if (dma_mapping_error(&a->pdev->dev, dma)) {
		dev_kfree_skb_any(skb);
		return -ENOMEM;
	}
	s->skb = skb;
	s->dma = dma;
	return 0;
}

static int ipnc_clean_rx(struct ipnc_adapter *a, int budget)
{
	struct net_device *nd = a->netdev;
	int done = 0;
	u32 last = U32_MAX;

	while (done < budget) {
		u32 i = a->rx_next_clean;
		struct ipnc_rx_desc *d = &a->rx_ring[i];
		struct ipnc_rx_slot *s = &a->rx_slots[i];
		struct sk_buff *skb;
		dma_addr_t dma;
		u16 flags, len;

		flags = le16_to_cpu(READ_ONCE(d->wb_flags));
		if (!(flags & IPNC_RX_WB_FLAGS_DD))
			break;
		dma_rmb();
		len = le16_to_cpu(d->length);
		done++;
		if ((flags & IPNC_RX_WB_FLAGS_ERROR) || len < ETH_HLEN || len > a->rx_buf_len) {
			/* truncated, or a refused descriptor: reuse the buffer */
			nd->stats.rx_errors++;
			a->sw.rx_truncated++;
			goto rearm;
		}
		skb = s->skb;
		dma = s->dma;
		if (ipnc_alloc_rx_buf(a, i, GFP_ATOMIC)) {
			/* no replacement: drop the frame, the card keeps the old buffer */
			nd->stats.rx_dropped++;
			a->sw.rx_alloc_fail++;
			goto rearm;
		}
		dma_unmap_single(&a->pdev->dev, dma, a->rx_buf_len, DMA_FROM_DEVICE);
		skb_put(skb, len);
		skb->protocol = eth_type_trans(skb, nd);
		nd->stats.rx_packets++;
		nd->stats.rx_bytes += len;
		if (flags & (IPNC_RX_WB_FLAGS_CRYPTO_DONE | IPNC_RX_WB_FLAGS_SA_DELETE_REQ))
			ipnc_ipsec_rx(a, skb, d);
		napi_gro_receive(&a->napi, skb);
rearm:
		ipnc_arm_rx(a, i);
		last = i;
		a->rx_next_clean = (i + 1) & (a->rx_count - 1);
	}
	if (last != U32_MAX) {
		/* TAIL = last re-armed slot keeps one descriptor between TAIL and HEAD */
		dma_wmb();
		ipnc_wr(a, IPNC_RXQ(0, IPNC_QREG_TAIL), last);
	}
	return done;
}

/*
 * Acknowledge first and never mask: a completion written back after the
 * card has taken the acknowledgment latches TX0/RX0 anew and sends a message
 * (at most one per ITR gap), which reschedules this poll if it has already
 * completed. The read makes "after" hold when the write was posted: it
 * returns once the card has taken the write, so whatever the card wrote back
 * before it is in the rings when we look. One write and one read per poll,
 * where masking around the poll (IMC, ICR, IMS) takes three writes.
 */
static int ipnc_poll(struct napi_struct *napi, int budget)
{
	struct ipnc_adapter *a = container_of(napi, struct ipnc_adapter, napi);
	int done;

	ipnc_wr(a, IPNC_REG_ICR, IPNC_QUEUE_CAUSES);
	ipnc_rd(a, IPNC_REG_ICR);	/* flush the posted write (reads clear nothing) */
	ipnc_clean_tx(a, budget);
	done = ipnc_clean_rx(a, budget);
	if (done < budget)
		napi_complete_done(napi, done);
	return done;
}

/* ---------------------------------------------------------------------- */
/* rings */

static void ipnc_free_rings(struct ipnc_adapter *a)
{
	struct device *dev = &a->pdev->dev;
	u32 i;

	if (a->tx_slots) {
		for (i = 0; i < a->tx_count; i++) {
			struct ipnc_tx_slot *s = &a->tx_slots[i];

			if (!s->skb)
				continue;
			dma_unmap_single(dev, s->dma, s->len, DMA_TO_DEVICE);
			dev_kfree_skb_any(s->skb);
			s->skb = NULL;
		}
	}
	if (a->rx_slots) {
		for (i = 0; i < a->rx_count; i++) {
			struct ipnc_rx_slot *s = &a->rx_slots[i];

			if (!s->skb)
				continue;
			dma_unmap_single(dev, s->dma, a->rx_buf_len, DMA_FROM_DEVICE);
			dev_kfree_skb_any(s->skb);
			s->skb = NULL;
		}
	}
	kfree(a->tx_slots);
	kfree(a->rx_slots);
	a->tx_slots = NULL;
	a->rx_slots = NULL;
	if (a->tx_ring)
		dma_free_coherent(dev, a->tx_count * sizeof(*a->tx_ring), a->tx_ring, a->tx_dma);
	if (a->rx_ring)
		dma_free_coherent(dev, a->rx_count * sizeof(*a->rx_ring), a->rx_ring, a->rx_dma);
	a->tx_ring = NULL;
	a->rx_ring = NULL;
}

static int ipnc_program_ring(struct ipnc_adapter *a, u32 base, dma_addr_t dma, u32 len, u32 tail)
{
	ipnc_wr(a, base + IPNC_QREG_CTRL, 0);
	ipnc_wr(a, base + IPNC_QREG_BASE_LO, lower_32_bits(dma));
	ipnc_wr(a, base + IPNC_QREG_BASE_HI, upper_32_bits(dma));
	ipnc_wr(a, base + IPNC_QREG_LEN, len);
	ipnc_wr(a, base + IPNC_QREG_TAIL, tail);
	ipnc_wr(a, base + IPNC_QREG_CTRL, IPNC_QUEUE_CTRL_ENABLE);
	if (!(ipnc_rd(a, base + IPNC_QREG_CTRL) & IPNC_QUEUE_CTRL_ENABLE)) {
		netdev_err(a->netdev, "ring at %#x refused (ERR_CODE %u ERR_INFO %#x)\n", base,
			   ipnc_rd(a, IPNC_REG_ERR_CODE), ipnc_rd(a, IPNC_REG_ERR_INFO));
		return -EIO;
	}
	return 0;
}

static int ipnc_alloc_rings(struct ipnc_adapter *a)
{
	struct device *dev = &a->pdev->dev;
	u32 count = rounddown_pow_of_two(min_t(u32, IPNC_RING_SIZE, a->max_ring));
	u32 i;

	a->tx_count = count;
	a->rx_count = count;
	a->rx_buf_len = max_t(u32, 2048 - NET_IP_ALIGN, a->netdev->mtu + IPNC_ETH_OVERHEAD);
	a->rx_buf_len = ALIGN(a->rx_buf_len, 64);
	a->tx_ring = dma_alloc_coherent(dev, count * sizeof(*a->tx_ring), &a->tx_dma, GFP_KERNEL);
	a->rx_ring = dma_alloc_coherent(dev, count * sizeof(*a->rx_ring), &a->rx_dma, GFP_KERNEL);
	a->tx_slots = kcalloc(count, sizeof(*a->tx_slots), GFP_KERNEL);
	a->rx_slots = kcalloc(count, sizeof(*a->rx_slots), GFP_KERNEL);
	if (!a->tx_ring || !a->rx_ring || !a->tx_slots || !a->rx_slots)
		goto nomem;
	for (i = 0; i < count; i++) {
		if (ipnc_alloc_rx_buf(a, i, GFP_KERNEL))
			goto nomem;
		ipnc_arm_rx(a, i);
	}
	a->tx_next_use = 0;
	a->tx_next_clean = 0;
	a->tx_tail = 0;
	a->rx_next_clean = 0;
	return 0;
nomem:
	ipnc_free_rings(a);
	return -ENOMEM;
}

/* ---------------------------------------------------------------------- */
/* netdev ops */

static int ipnc_open(struct net_device *nd)
{
	struct ipnc_adapter *a = netdev_priv(nd);
	int err;

	err = ipnc_alloc_rings(a);
	if (err)
		return err;
	ipnc_wr(a, IPNC_REG_MTU, nd->mtu);
	err = ipnc_program_ring(a, IPNC_TXQ(0, 0), a->tx_dma, a->tx_count, 0);
	if (!err)
		err = ipnc_program_ring(a, IPNC_RXQ(0, 0), a->rx_dma, a->rx_count, a->rx_count - 1);
	if (err)
		goto fail;
	netdev_reset_queue(nd);
	napi_enable(&a->napi);
	ipnc_wr(a, IPNC_REG_ITR, a->itr_us);
	ipnc_wr(a, IPNC_REG_ICR, IPNC_QUEUE_CAUSES);
	ipnc_wr(a, IPNC_REG_IMS, IPNC_QUEUE_CAUSES | IPNC_MISC_CAUSES);
	netif_carrier_off(nd);
	ipnc_update_link(a);
	netif_start_queue(nd);
	return 0;
fail:
	ipnc_wr(a, IPNC_TXQ(0, IPNC_QREG_CTRL), 0);
	ipnc_wr(a, IPNC_RXQ(0, IPNC_QREG_CTRL), 0);
	ipnc_free_rings(a);
	return err;
}

static void ipnc_stop_rings(struct ipnc_adapter *a)
{
	/* RX first: it is the ring the card writes unprompted. */
	ipnc_wr(a, IPNC_RXQ(0, IPNC_QREG_CTRL), 0);
	ipnc_wr(a, IPNC_TXQ(0, IPNC_QREG_CTRL), 0);
	ipnc_wr(a, IPNC_REG_IMC, IPNC_QUEUE_CAUSES);
	ipnc_rd(a, IPNC_REG_STATUS);	/* flush posted writes */
}

static int ipnc_close(struct net_device *nd)
{
	struct ipnc_adapter *a = netdev_priv(nd);

	netif_stop_queue(nd);
	netif_carrier_off(nd);
	ipnc_stop_rings(a);
	napi_disable(&a->napi);
	synchronize_irq(a->irq_queue);
	ipnc_free_rings(a);
	return 0;
}

static int ipnc_change_mtu(struct net_device *nd, int mtu)
{
	struct ipnc_adapter *a = netdev_priv(nd);
	bool running = netif_running(nd);

	if (running)
		ipnc_close(nd);
	WRITE_ONCE(nd->mtu, mtu);
	ipnc_wr(a, IPNC_REG_MTU, mtu);
	if (ipnc_rd(a, IPNC_REG_MTU) != mtu)
		netdev_warn(nd, "card kept MTU %u\n", ipnc_rd(a, IPNC_REG_MTU));
	return running ? ipnc_open(nd) : 0;
}

static void ipnc_set_rx_mode(struct net_device *nd)
{
	struct ipnc_adapter *a = netdev_priv(nd);
	u32 ctrl = ipnc_rd(a, IPNC_REG_CTRL) & ~IPNC_CTRL_RESET;

	if (nd->flags & IFF_PROMISC)
		ctrl |= IPNC_CTRL_PROMISC;
	else
		ctrl &= ~IPNC_CTRL_PROMISC;
	ipnc_wr(a, IPNC_REG_CTRL, ctrl);
}

static const struct net_device_ops ipnc_netdev_ops = {
	.ndo_open		= ipnc_open,
	.ndo_stop		= ipnc_close,
	.ndo_start_xmit		= ipnc_xmit,
	.ndo_change_mtu		= ipnc_change_mtu,
	.ndo_set_rx_mode	= ipnc_set_rx_mode,
	.ndo_validate_addr	= eth_validate_addr,
};

/* ---------------------------------------------------------------------- */
/* ethtool */

static const char * const ipnc_reg_stat_names[] = IPNC_STAT_NAMES;
static const char * const ipnc_fw_stat_names[] = IPNC_FW_STAT_NAMES;

static const char * const ipnc_sw_stat_names[] = {
	"ipsec_tx_pkts", "ipsec_rx_pkts", "ipsec_rx_drop_auth_fail", "ipsec_rx_drop_bad",
	"ipsec_rx_no_state", "ipsec_rx_decap", "ipsec_sa_delete_req", "ipsec_tx_drop_no_handle",
	"ipsec_tx_drop_no_neigh",
	"tx_ok", "tx_drop_dma_error", "tx_drop_bad_length", "tx_drop_bad_handle",
	"tx_drop_offload_failed", "tx_drop_bad_descriptor", "rx_drop_truncated",
	"rx_drop_alloc_fail", "tx_busy", "tx_doorbells", "queue_irqs",
};

static_assert(ARRAY_SIZE(ipnc_sw_stat_names) == sizeof(struct ipnc_sw_stats) / sizeof(u64));
static_assert(ARRAY_SIZE(ipnc_reg_stat_names) == IPNC_NUM_STATS);
static_assert(ARRAY_SIZE(ipnc_fw_stat_names) == IPNC_NUM_FW_STATS);

#define IPNC_NUM_ETHTOOL_STATS \
	(ARRAY_SIZE(ipnc_sw_stat_names) + IPNC_NUM_STATS + IPNC_NUM_FW_STATS)

static void ipnc_get_drvinfo(struct net_device *nd, struct ethtool_drvinfo *info)
{
	struct ipnc_adapter *a = netdev_priv(nd);

	strscpy(info->driver, IPNC_DRV_NAME, sizeof(info->driver));
	snprintf(info->fw_version, sizeof(info->fw_version), "%u.%u.%u hw %u.%u.%u",
		 a->fw_version >> 16, (a->fw_version >> 8) & 0xff, a->fw_version & 0xff,
		 a->hw_version >> 16, (a->hw_version >> 8) & 0xff, a->hw_version & 0xff);
	strscpy(info->bus_info, pci_name(a->pdev), sizeof(info->bus_info));
}

static int ipnc_get_sset_count(struct net_device *nd, int sset)
{
	return sset == ETH_SS_STATS ? IPNC_NUM_ETHTOOL_STATS : -EOPNOTSUPP;
}

static void ipnc_get_strings(struct net_device *nd, u32 sset, u8 *data)
{
	unsigned int i;

	if (sset != ETH_SS_STATS)
		return;
	for (i = 0; i < ARRAY_SIZE(ipnc_sw_stat_names); i++)
		ethtool_puts(&data, ipnc_sw_stat_names[i]);
	for (i = 0; i < IPNC_NUM_STATS; i++)
		ethtool_sprintf(&data, "card_%s", ipnc_reg_stat_names[i]);
	for (i = 0; i < IPNC_NUM_FW_STATS; i++)
		ethtool_sprintf(&data, "fw_%s", ipnc_fw_stat_names[i]);
}

static void ipnc_get_ethtool_stats(struct net_device *nd, struct ethtool_stats *stats, u64 *data)
{
	struct ipnc_adapter *a = netdev_priv(nd);
	struct ipnc_global_stats *fw;
	const u64 *sw = (const u64 *)&a->sw;
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(ipnc_sw_stat_names); i++)
		*data++ = READ_ONCE(sw[i]);
	for (i = 0; i < IPNC_NUM_STATS; i++)
		*data++ = ipnc_rd64(a, IPNC_STAT_TX_PACKETS + 8 * i);
	fw = kzalloc(sizeof(*fw), GFP_KERNEL);
	if (fw && ipnc_get_fw_stats(a, fw))
		memset(fw, 0, sizeof(*fw));
	for (i = 0; i < IPNC_NUM_FW_STATS; i++) {
		__le64 v = 0;

		if (fw)
			memcpy(&v, (u8 *)fw + IPNC_FW_STAT_FIRST + 8 * i, sizeof(v));
		*data++ = le64_to_cpu(v);
	}
	kfree(fw);
}

/*
 * ITR moderates a whole MSI-X vector and TX0 and RX0 share one, so rx-usecs
 * and tx-usecs are one value: changing either sets both.
 */
static int ipnc_get_coalesce(struct net_device *nd, struct ethtool_coalesce *ec,
			     struct kernel_ethtool_coalesce *kec, struct netlink_ext_ack *extack)
{
	struct ipnc_adapter *a = netdev_priv(nd);

	ec->rx_coalesce_usecs = a->itr_us;
	ec->tx_coalesce_usecs = a->itr_us;
	return 0;
}

static int ipnc_set_coalesce(struct net_device *nd, struct ethtool_coalesce *ec,
			     struct kernel_ethtool_coalesce *kec, struct netlink_ext_ack *extack)
{
	struct ipnc_adapter *a = netdev_priv(nd);
	u32 usecs = ec->rx_coalesce_usecs;

	if (ec->tx_coalesce_usecs != a->itr_us) {
		if (usecs != a->itr_us && usecs != ec->tx_coalesce_usecs) {
			NL_SET_ERR_MSG_MOD(extack, "rx-usecs and tx-usecs share one ITR register");
			return -EINVAL;
		}
		usecs = ec->tx_coalesce_usecs;
	}
	if (usecs > IPNC_ITR_MAX_US) {
		NL_SET_ERR_MSG_MOD(extack, "ITR is at most 65535 us");
		return -ERANGE;
	}
	a->itr_us = usecs;
	ipnc_wr(a, IPNC_REG_ITR, usecs);
	return 0;
}

static const struct ethtool_ops ipnc_ethtool_ops = {
	.supported_coalesce_params = ETHTOOL_COALESCE_USECS,
	.get_drvinfo		= ipnc_get_drvinfo,
	.get_link		= ethtool_op_get_link,
	.get_sset_count		= ipnc_get_sset_count,
	.get_strings		= ipnc_get_strings,
	.get_ethtool_stats	= ipnc_get_ethtool_stats,
	.get_coalesce		= ipnc_get_coalesce,
	.set_coalesce		= ipnc_set_coalesce,
};

/* ---------------------------------------------------------------------- */
/* probe / remove */

static int ipnc_wait_ready(struct ipnc_adapter *a)
{
	int i;

	for (i = 0; i < 200; i++) {
		if (ipnc_rd(a, IPNC_REG_STATUS) & IPNC_STATUS_READY)
			return 0;
		usleep_range(10000, 20000);
	}
	return -ETIMEDOUT;
}

static void ipnc_read_caps(struct ipnc_adapter *a)
{
	u32 lo = ipnc_rd(a, IPNC_REG_MAC_LO), hi = ipnc_rd(a, IPNC_REG_MAC_HI);
	u8 mac[ETH_ALEN] = { lo, lo >> 8, lo >> 16, lo >> 24, hi, hi >> 8 };

	a->hw_version = ipnc_rd(a, IPNC_REG_HW_VERSION);
	a->fw_version = ipnc_rd(a, IPNC_REG_FW_VERSION);
	a->features = ipnc_rd(a, IPNC_REG_FEATURES);
	a->sa_capacity = ipnc_rd(a, IPNC_REG_SA_CAPACITY);
	a->enc_algos = ipnc_rd(a, IPNC_REG_ENC_ALGOS);
	a->auth_algos = ipnc_rd(a, IPNC_REG_AUTH_ALGOS);
	a->max_replay_window = ipnc_rd(a, IPNC_REG_MAX_REPLAY_WINDOW);
	a->max_ring = ipnc_rd(a, IPNC_REG_MAX_RING_SIZE);
	a->max_mtu = ipnc_rd(a, IPNC_REG_MAX_MTU);
	a->aq_max_len = ipnc_rd(a, IPNC_REG_AQ_MAX_LEN);
	a->aq_max_buf = ipnc_rd(a, IPNC_REG_AQ_MAX_BUF);
	if (is_valid_ether_addr(mac))
		eth_hw_addr_set(a->netdev, mac);
	else
		eth_hw_addr_random(a->netdev);
}

static int ipnc_setup_irqs(struct ipnc_adapter *a)
{
	struct net_device *nd = a->netdev;
	int err;

	err = pci_alloc_irq_vectors(a->pdev, IPNC_NUM_VECS, IPNC_NUM_VECS, PCI_IRQ_MSIX);
	if (err < 0)
		return err;
	a->irq_misc = pci_irq_vector(a->pdev, IPNC_VEC_MISC);
	a->irq_queue = pci_irq_vector(a->pdev, IPNC_VEC_QUEUE);
	snprintf(a->irq_names[0], sizeof(a->irq_names[0]), "%s-misc", pci_name(a->pdev));
	snprintf(a->irq_names[1], sizeof(a->irq_names[1]), "%s-txrx-0", pci_name(a->pdev));
	err = request_irq(a->irq_misc, ipnc_misc_irq, 0, a->irq_names[0], a);
	if (err)
		goto free_vectors;
	err = request_irq(a->irq_queue, ipnc_queue_irq, 0, a->irq_names[1], a);
	if (err)
		goto free_misc;
	netdev_dbg(nd, "MSI-X vectors %d (misc) and %d (queue 0)\n", a->irq_misc, a->irq_queue);
	return 0;
free_misc:
	free_irq(a->irq_misc, a);
free_vectors:
	pci_free_irq_vectors(a->pdev);
	return err;
}

static void ipnc_free_irqs(struct ipnc_adapter *a)
{
	free_irq(a->irq_queue, a);
	free_irq(a->irq_misc, a);
	pci_free_irq_vectors(a->pdev);
}

/*
 * CTRL.ENABLE stays set from probe to remove: the admin queue only runs while it
 * is (datasheet 4.1), and SAs can be added and counters read with the link down.
 * ndo_open/ndo_stop switch the rings.
 */
static int ipnc_enable(struct ipnc_adapter *a)
{
	int i;

	ipnc_wr(a, IPNC_REG_CTRL,
		IPNC_CTRL_ENABLE | (IPNC_INT_MODE_VECTORS << IPNC_CTRL_INT_MODE_SHIFT));
	for (i = 0; i < 200; i++) {
		if (ipnc_rd(a, IPNC_REG_STATUS) & IPNC_STATUS_ENABLED)
			return 0;
		usleep_range(10000, 20000);
	}
	dev_err(&a->pdev->dev, "card did not enable (ERR_CODE %u ERR_INFO %#x)\n",
		ipnc_rd(a, IPNC_REG_ERR_CODE), ipnc_rd(a, IPNC_REG_ERR_INFO));
	return -EIO;
}

static void ipnc_reset(struct ipnc_adapter *a)
{
	/* Every register, ring and SA back to reset state; self-clearing. */
	ipnc_wr(a, IPNC_REG_CTRL, IPNC_CTRL_RESET);
	ipnc_rd(a, IPNC_REG_STATUS);
}

static int ipnc_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct ipnc_adapter *a;
	struct net_device *nd;
	u32 magic, version;
	int err;

	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (err)
		return err;
	err = pcim_iomap_regions(pdev, BIT(0), IPNC_DRV_NAME);
	if (err)
		return err;
	pci_set_master(pdev);

	nd = devm_alloc_etherdev(&pdev->dev, sizeof(*a));
	if (!nd)
		return -ENOMEM;
	SET_NETDEV_DEV(nd, &pdev->dev);
	a = netdev_priv(nd);
	a->pdev = pdev;
	a->netdev = nd;
	a->hw = pcim_iomap_table(pdev)[0];
	pci_set_drvdata(pdev, a);
	mutex_init(&a->aq_lock);
	spin_lock_init(&a->stats_lock);
	INIT_WORK(&a->link_work, ipnc_link_work);

	magic = ipnc_rd(a, IPNC_REG_ID);
	version = ipnc_rd(a, IPNC_REG_REGMAP_VERSION);
	if (magic != IPNC_ID_MAGIC) {
		dev_err(&pdev->dev, "ID register %#x is not 'IPNC'\n", magic);
		return -ENODEV;
	}
	if (version >> 16 != IPNC_REGMAP_VERSION >> 16) {
		dev_err(&pdev->dev, "register map %u.%u not supported (driver speaks %u.x)\n",
			version >> 16, (version >> 8) & 0xff, IPNC_REGMAP_VERSION >> 16);
		return -ENODEV;
	}
	/* Start clean: SAs a previous driver left on the card are not ours. */
	ipnc_reset(a);
	err = ipnc_wait_ready(a);
	if (err) {
		dev_err(&pdev->dev, "card not READY after reset\n");
		return err;
	}
	ipnc_read_caps(a);
	a->itr_us = IPNC_DEFAULT_ITR_US;
	ipnc_wr(a, IPNC_REG_IMC, 0xffffffff);
	ipnc_wr(a, IPNC_REG_ICR, 0xffffffff);

	err = ipnc_admin_init(a);
	if (err)
		return err;
	err = ipnc_setup_irqs(a);
	if (err)
		goto free_admin;
	err = ipnc_enable(a);
	if (err)
		goto free_irqs;

	nd->netdev_ops = &ipnc_netdev_ops;
	nd->ethtool_ops = &ipnc_ethtool_ops;
	nd->min_mtu = IPNC_MIN_MTU;
	nd->max_mtu = a->max_mtu ? a->max_mtu : ETH_DATA_LEN;
	nd->mtu = min_t(u32, ipnc_rd(a, IPNC_REG_MTU), nd->max_mtu);
	netif_napi_add(nd, &a->napi, ipnc_poll);
	ipnc_ipsec_init(a);

	err = register_netdev(nd);
	if (err)
		goto del_napi;
	ipnc_wr(a, IPNC_REG_IMS, IPNC_MISC_CAUSES);
	ipnc_debugfs_init(a, ipnc_debugfs_root);
	netdev_info(nd, "ipsec-nic %s, hw %u.%u fw %u.%u, MAC %pM, %u SAs, features %#x\n",
		    pci_name(pdev), a->hw_version >> 16, (a->hw_version >> 8) & 0xff,
		    a->fw_version >> 16, (a->fw_version >> 8) & 0xff, nd->dev_addr,
		    a->sa_capacity, a->features);
	return 0;

del_napi:
	ipnc_ipsec_stop(a);
	netif_napi_del(&a->napi);
free_irqs:
	ipnc_wr(a, IPNC_REG_CTRL, 0);
	ipnc_free_irqs(a);
free_admin:
	ipnc_admin_stop(a);
	ipnc_admin_free(a);
	return err;
}

static void ipnc_remove(struct pci_dev *pdev)
{
	struct ipnc_adapter *a = pci_get_drvdata(pdev);

	/* The stack flushes our SAs (xdo_dev_state_free -> DELETE_SA) while the
	 * admin queue still runs.
	 */
	ipnc_debugfs_exit(a);
	unregister_netdev(a->netdev);
	ipnc_ipsec_stop(a);
	cancel_work_sync(&a->link_work);
	ipnc_wr(a, IPNC_REG_IMC, 0xffffffff);
	netif_napi_del(&a->napi);
	ipnc_free_irqs(a);
	ipnc_admin_stop(a);
	ipnc_wr(a, IPNC_REG_CTRL, 0);
	ipnc_admin_free(a);
}

static void ipnc_shutdown(struct pci_dev *pdev)
{
	struct ipnc_adapter *a = pci_get_drvdata(pdev);

	rtnl_lock();
	netif_device_detach(a->netdev);
	if (netif_running(a->netdev))
		ipnc_close(a->netdev);
	rtnl_unlock();
	ipnc_admin_stop(a);
	ipnc_wr(a, IPNC_REG_CTRL, 0);
	pci_clear_master(pdev);
}

static struct pci_driver ipnc_driver = {
	.name		= IPNC_DRV_NAME,
	.id_table	= ipnc_pci_tbl,
	.probe		= ipnc_probe,
	.remove		= ipnc_remove,
	.shutdown	= ipnc_shutdown,
};

static int __init ipnc_init(void)
{
	int err;

	ipnc_debugfs_root = debugfs_create_dir(IPNC_DRV_NAME, NULL);
	err = pci_register_driver(&ipnc_driver);
	if (err)
		debugfs_remove_recursive(ipnc_debugfs_root);
	return err;
}

static void __exit ipnc_exit(void)
{
	pci_unregister_driver(&ipnc_driver);
	debugfs_remove_recursive(ipnc_debugfs_root);
}

module_init(ipnc_init);
module_exit(ipnc_exit);

MODULE_AUTHOR("ipsec-nic project");
MODULE_DESCRIPTION("ipsec-nic emulated Ethernet card with IPsec crypto and packet offload");
MODULE_LICENSE("GPL");

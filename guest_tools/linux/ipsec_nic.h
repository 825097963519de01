/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ipsec-nic: Linux driver for the emulated ipsec-nic PCIe Ethernet card
 * with IPsec crypto and packet offload.
 */
#ifndef IPSEC_NIC_H
#define IPSEC_NIC_H

#include <linux/hashtable.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/mutex.h>
#include <linux/netdevice.h>
#include <linux/pci.h>
#include <linux/workqueue.h>
#include <net/xfrm.h>

#include "ipsec_nic_hw.h"

#define IPNC_DRV_NAME		"ipsec_nic"
#define IPNC_RING_SIZE		256
#define IPNC_ADMIN_RING_SIZE	16
#define IPNC_ADMIN_BUF_SIZE	4096
#define IPNC_ADMIN_TIMEOUT_MS	10000	/* the card is emulated: TCG guests are slow */
#define IPNC_ETH_OVERHEAD	(ETH_HLEN + VLAN_HLEN)
#define IPNC_VEC_MISC		0
#define IPNC_VEC_QUEUE		1
#define IPNC_NUM_VECS		2
#define IPNC_STATS_INTERVAL	(2 * HZ)
/*
 * Default ITR (ethtool rx-usecs/tx-usecs): at most one queue interrupt per
 * this many microseconds. The card is emulated and its guest usually runs
 * under TCG, where a packet costs the vCPU 100-500 us and every interrupt
 * plus its ICR acknowledgment costs a vfio-user round trip; a gap of this
 * size lets one interrupt reap a burst of TX completions.
 */
#define IPNC_DEFAULT_ITR_US	250
#define IPNC_ITR_MAX_US		0xffff

struct ipnc_tx_slot {
	struct sk_buff *skb;
	dma_addr_t dma;
	u32 len;
	u32 sa_handle;			/* IPsec frame: the SA it was sent with, else 0 */
	u32 sa_bytes;			/* its plain IP packet bytes, as the card counts them */
};

struct ipnc_rx_slot {
	struct sk_buff *skb;
	dma_addr_t dma;
};

/* Software counters shown by ethtool -S next to the card's registers. */
struct ipnc_sw_stats {
	u64 ipsec_tx_pkts;		/* frames the card offloaded and sent (mlx5's names) */
	u64 ipsec_rx_pkts;		/* frames the card decrypted and verified */
	u64 ipsec_rx_auth_fail;		/* CRYPTO_DONE with an ICV failure */
	u64 ipsec_rx_bad;		/* CRYPTO_DONE with another error status */
	u64 ipsec_rx_no_state;		/* CRYPTO_DONE for a handle no longer offloaded */
	u64 ipsec_rx_decap;		/* packet offload: decapsulated by the card */
	u64 ipsec_sa_delete_req;	/* SaDeleteReq events passed to the stack */
	u64 ipsec_tx_no_handle;		/* sec_path state not offloaded to us: dropped */
	u64 ipsec_tx_no_neigh;		/* packet tunnel: outer next hop unresolved, dropped */
	u64 tx_status[IPNC_TX_STATUS_BAD_DESCRIPTOR + 1];	/* by TxStatus */
	u64 rx_truncated;
	u64 rx_alloc_fail;
	u64 tx_busy;
	u64 tx_doorbells;		/* TXQ TAIL writes (one per xmit_more burst) */
	u64 queue_irqs;			/* interrupts on the queue vector */
};

/* One xfrm_state offloaded to the card. x->xso.offload_handle is the card's handle. */
struct ipnc_sa {
	struct hlist_node node;		/* adapter->sa_table, by handle (RX lookup) */
	struct list_head list;		/* adapter->sa_list (process context) */
	struct rcu_head rcu;
	struct xfrm_state *xs;
	u32 handle;
	u32 spi;			/* host order */
	u8 icv_len;
	bool inbound;
	bool packet;
	bool esn;
	bool deleted;			/* xdo_dev_state_delete ran */
	u32 card_seq_hi;		/* ESN high half the card holds (UPDATE_SA) */
	u32 want_seq_hi;		/* inbound: what advance_esn asked for */
	bool delete_req;		/* SaDeleteReq seen, expire not yet reported */
	bool delete_req_reported;
	/* packet offload: the card's counters, cached by the stats work ... */
	u64 packets;
	u64 bytes;
	/* ... and what the driver itself handed over or received, always current */
	atomic64_t drv_packets;
	atomic64_t drv_bytes;
};

struct ipnc_adapter {
	struct pci_dev *pdev;
	struct net_device *netdev;
	void __iomem *hw;

	/* capabilities */
	u32 features;
	u32 enc_algos;
	u32 auth_algos;
	u32 sa_capacity;
	u32 max_ring;
	u32 max_mtu;
	u32 max_replay_window;
	u32 aq_max_len;
	u32 aq_max_buf;
	u32 hw_version;
	u32 fw_version;

	/* admin queue (process context, one command at a time) */
	struct mutex aq_lock;
	struct ipnc_admin_desc *aq;
	dma_addr_t aq_dma;
	u32 aq_len;
	u32 aq_tail;
	u64 aq_cookie;
	void *aq_req;
	dma_addr_t aq_req_dma;
	void *aq_resp;
	dma_addr_t aq_resp_dma;
	u32 aq_buf_size;
	u32 aq_last_fw_status;		/* of the last command, for messages */
	bool aq_up;

	/* data path: one TX and one RX queue on MSI-X vector 1 */
	struct napi_struct napi;
	struct ipnc_tx_desc *tx_ring;
	dma_addr_t tx_dma;
	struct ipnc_tx_slot *tx_slots;
	u32 tx_count;
	u32 tx_next_use;
	u32 tx_next_clean;
	u32 tx_tail;			/* the TAIL value last written to the card */
	struct ipnc_rx_desc *rx_ring;
	dma_addr_t rx_dma;
	struct ipnc_rx_slot *rx_slots;
	u32 rx_count;
	u32 rx_next_clean;
	u32 rx_buf_len;

	u32 itr_us;			/* ITR, microseconds (ethtool -C) */

	int irq_misc;
	int irq_queue;
	char irq_names[IPNC_NUM_VECS][IFNAMSIZ + 16];

	struct ipnc_sw_stats sw;
	spinlock_t stats_lock;		/* sw counters updated outside NAPI */

	/* offloaded SAs */
	spinlock_t sa_lock;		/* sa_table writers */
	DECLARE_HASHTABLE(sa_table, 6);
	struct mutex sa_list_lock;	/* sa_list and the SA walks of sa/stats_work */
	struct list_head sa_list;
	struct list_head policies;	/* packet offload, outbound (RCU, sa_lock) */
	struct work_struct sa_work;	/* ESN updates, SaDeleteReq, deferred deletes */
	struct delayed_work stats_work;	/* packet offload: card SA counters */
	bool sa_delete_req_pending;

	struct work_struct link_work;
	struct dentry *debugfs;
};

/* registers */
static inline u32 ipnc_rd(struct ipnc_adapter *a, u32 reg)
{
	return readl(a->hw + reg);
}

static inline void ipnc_wr(struct ipnc_adapter *a, u32 reg, u32 val)
{
	writel(val, a->hw + reg);
}

u64 ipnc_rd64(struct ipnc_adapter *a, u32 reg);

/* ipsec_nic_admin.c */
int ipnc_admin_init(struct ipnc_adapter *a);
void ipnc_admin_stop(struct ipnc_adapter *a);
void ipnc_admin_free(struct ipnc_adapter *a);
int ipnc_admin_cmd(struct ipnc_adapter *a, u16 opcode, const void *req, u32 req_len,
		   void *resp, u32 *resp_len);
int ipnc_delete_handles(struct ipnc_adapter *a, const u32 *handles, unsigned int count);
int ipnc_get_fw_stats(struct ipnc_adapter *a, struct ipnc_global_stats *stats);

/* ipsec_nic_ipsec.c */
void ipnc_ipsec_init(struct ipnc_adapter *a);
void ipnc_ipsec_stop(struct ipnc_adapter *a);
bool ipnc_ipsec_tx(struct ipnc_adapter *a, struct sk_buff *skb, struct ipnc_tx_desc *desc);
bool ipnc_ipsec_tx_plain(struct ipnc_adapter *a, struct sk_buff *skb, struct ipnc_tx_desc *desc);
void ipnc_ipsec_tx_done(struct ipnc_adapter *a, u32 handle, u32 bytes);
void ipnc_ipsec_rx(struct ipnc_adapter *a, struct sk_buff *skb, const struct ipnc_rx_desc *desc);
void ipnc_ipsec_sa_delete_req(struct ipnc_adapter *a);
void ipnc_debugfs_init(struct ipnc_adapter *a, struct dentry *root);
void ipnc_debugfs_exit(struct ipnc_adapter *a);

#endif /* IPSEC_NIC_H */

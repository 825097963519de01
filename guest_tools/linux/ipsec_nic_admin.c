// SPDX-License-Identifier: GPL-2.0
/*
 * ipsec-nic admin queue: one command at a time, from process context.
 *
 * The card completes descriptors from its own loop (datasheet 5.1); we poll the
 * descriptor's DONE flag, which the card writes last, so every write-back field
 * is valid once it is seen.
 */
#include <linux/delay.h>
#include <linux/dma-mapping.h>
#include <linux/jiffies.h>
#include <linux/slab.h>
#include <linux/string.h>

#include "ipsec_nic.h"

static const char *ipnc_admin_status_text(u16 status)
{
	switch (status) {
	case IPNC_ADMIN_STATUS_DMA_ERROR:
		return "request or response buffer unreachable";
	case IPNC_ADMIN_STATUS_REQUEST_TOO_LONG:
		return "request longer than AQ_MAX_BUF";
	case IPNC_ADMIN_STATUS_RESPONSE_TRUNCATED:
		return "response truncated";
	case IPNC_ADMIN_STATUS_BAD_DESCRIPTOR:
		return "bad descriptor";
	case IPNC_ADMIN_STATUS_FIRMWARE_FAULT:
		return "firmware fault";
	default:
		return "unknown admin status";
	}
}

int ipnc_admin_init(struct ipnc_adapter *a)
{
	struct device *dev = &a->pdev->dev;
	u32 len = min_t(u32, IPNC_ADMIN_RING_SIZE, a->aq_max_len);

	len = rounddown_pow_of_two(len);
	if (len < IPNC_MIN_RING_SIZE)
		return -EINVAL;
	a->aq_len = len;
	a->aq_buf_size = IPNC_ADMIN_BUF_SIZE;
	if (a->aq_max_buf && a->aq_max_buf < a->aq_buf_size)
		a->aq_buf_size = a->aq_max_buf;
	a->aq = dma_alloc_coherent(dev, len * sizeof(*a->aq), &a->aq_dma, GFP_KERNEL);
	a->aq_req = dma_alloc_coherent(dev, a->aq_buf_size, &a->aq_req_dma, GFP_KERNEL);
	a->aq_resp = dma_alloc_coherent(dev, a->aq_buf_size, &a->aq_resp_dma, GFP_KERNEL);
	if (!a->aq || !a->aq_req || !a->aq_resp) {
		ipnc_admin_free(a);
		return -ENOMEM;
	}
	a->aq_tail = 0;
	ipnc_wr(a, IPNC_ADMINQ_BASE + IPNC_QREG_CTRL, 0);
	ipnc_wr(a, IPNC_ADMINQ_BASE + IPNC_QREG_BASE_LO, lower_32_bits(a->aq_dma));
	ipnc_wr(a, IPNC_ADMINQ_BASE + IPNC_QREG_BASE_HI, upper_32_bits(a->aq_dma));
	ipnc_wr(a, IPNC_ADMINQ_BASE + IPNC_QREG_LEN, len);
	ipnc_wr(a, IPNC_ADMINQ_BASE + IPNC_QREG_TAIL, 0);
	ipnc_wr(a, IPNC_ADMINQ_BASE + IPNC_QREG_CTRL, IPNC_QUEUE_CTRL_ENABLE);
	if (!(ipnc_rd(a, IPNC_ADMINQ_BASE + IPNC_QREG_CTRL) & IPNC_QUEUE_CTRL_ENABLE)) {
		dev_err(dev, "admin queue refused (ERR_CODE %u ERR_INFO %#x)\n",
			ipnc_rd(a, IPNC_REG_ERR_CODE), ipnc_rd(a, IPNC_REG_ERR_INFO));
		ipnc_admin_free(a);
		return -EIO;
	}
	a->aq_up = true;
	return 0;
}

void ipnc_admin_stop(struct ipnc_adapter *a)
{
	mutex_lock(&a->aq_lock);
	if (a->aq_up)
		ipnc_wr(a, IPNC_ADMINQ_BASE + IPNC_QREG_CTRL, 0);
	a->aq_up = false;
	mutex_unlock(&a->aq_lock);
}

void ipnc_admin_free(struct ipnc_adapter *a)
{
	struct device *dev = &a->pdev->dev;

	if (a->aq)
		dma_free_coherent(dev, a->aq_len * sizeof(*a->aq), a->aq, a->aq_dma);
	if (a->aq_req)
		dma_free_coherent(dev, a->aq_buf_size, a->aq_req, a->aq_req_dma);
	if (a->aq_resp)
		dma_free_coherent(dev, a->aq_buf_size, a->aq_resp, a->aq_resp_dma);
	a->aq = NULL;
	a->aq_req = NULL;
	a->aq_resp = NULL;
}

/*
 * Run one admin command. Returns 0 when the firmware answered NDIS_STATUS_SUCCESS
 * (the response is copied to @resp, at most *@resp_len bytes, and *@resp_len is
 * set to its length), -EREMOTEIO when it answered another status (logged), or a
 * negative errno when the descriptor failed or timed out.
 */
int ipnc_admin_cmd(struct ipnc_adapter *a, u16 opcode, const void *req, u32 req_len,
		   void *resp, u32 *resp_len)
{
	struct ipnc_admin_desc *d;
	unsigned long deadline;
	u32 fw_status, len;
	u16 status;
	int err = 0;

	if (req_len > a->aq_buf_size)
		return -EMSGSIZE;
	mutex_lock(&a->aq_lock);
	if (!a->aq_up) {
		err = -ENODEV;
		goto out;
	}
	d = &a->aq[a->aq_tail];
	memset(d, 0, sizeof(*d));
	if (req_len)
		memcpy(a->aq_req, req, req_len);
	a->aq_cookie++;
	d->opcode = cpu_to_le16(opcode);
	d->req_len = cpu_to_le32(req_len);
	d->req_addr = cpu_to_le64(req_len ? a->aq_req_dma : 0);
	d->resp_addr = cpu_to_le64(a->aq_resp_dma);
	d->resp_len = cpu_to_le32(a->aq_buf_size);
	d->cookie = cpu_to_le64(a->aq_cookie);
	a->aq_tail = (a->aq_tail + 1) & (a->aq_len - 1);
	dma_wmb();
	ipnc_wr(a, IPNC_ADMINQ_BASE + IPNC_QREG_TAIL, a->aq_tail);

	deadline = jiffies + msecs_to_jiffies(IPNC_ADMIN_TIMEOUT_MS);
	while (!(le16_to_cpu(READ_ONCE(d->flags)) & IPNC_ADMIN_FLAGS_DONE)) {
		if (time_after(jiffies, deadline)) {
			netdev_err(a->netdev, "admin command %#06x timed out (AQ_HEAD %u, STATUS %#x)\n",
				   opcode, ipnc_rd(a, IPNC_ADMINQ_BASE + IPNC_QREG_HEAD),
				   ipnc_rd(a, IPNC_REG_STATUS));
			err = -ETIMEDOUT;
			goto wipe;
		}
		usleep_range(20, 200);
	}
	dma_rmb();
	status = le16_to_cpu(d->status);
	fw_status = le32_to_cpu(d->fw_status);
	len = le32_to_cpu(d->resp_len);
	if (le64_to_cpu(d->cookie) != a->aq_cookie) {
		netdev_err(a->netdev, "admin descriptor came back with a foreign cookie\n");
		err = -EIO;
	} else if (status != IPNC_ADMIN_STATUS_OK) {
		netdev_err(a->netdev, "admin command %#06x: %s\n", opcode,
			   ipnc_admin_status_text(status));
		err = -EIO;
	} else if (fw_status != IPNC_NDIS_STATUS_SUCCESS) {
		netdev_dbg(a->netdev, "admin command %#06x: firmware status %#010x\n",
			   opcode, fw_status);
		err = -EREMOTEIO;
	} else if (resp && resp_len) {
		len = min3(len, *resp_len, a->aq_buf_size);
		memcpy(resp, a->aq_resp, len);
		*resp_len = len;
	}
	a->aq_last_fw_status = fw_status;
wipe:
	/* Key material must not linger in DMA memory (datasheet 5.1). */
	if (req_len)
		memzero_explicit(a->aq_req, req_len);
out:
	mutex_unlock(&a->aq_lock);
	return err;
}

int ipnc_delete_handles(struct ipnc_adapter *a, const u32 *handles, unsigned int count)
{
	struct ipnc_v2_delete_sa *e;
	unsigned int i;
	u8 *buf;
	u32 resp_len;
	int err;

	if (!count)
		return 0;
	buf = kcalloc(count, sizeof(*e), GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	for (i = 0; i < count; i++) {
		e = (struct ipnc_v2_delete_sa *)(buf + i * sizeof(*e));
		e->header_type = IPNC_NDIS_OBJECT_TYPE_DEFAULT;
		e->header_revision = IPNC_NDIS_REVISION_1;
		e->header_size = cpu_to_le16(sizeof(*e));
		e->next_offset = cpu_to_le32(i + 1 < count ? sizeof(*e) : 0);
		e->offload_handle = cpu_to_le32(handles[i]);
	}
	resp_len = 0;
	err = ipnc_admin_cmd(a, IPNC_OPCODE_V2_DELETE_SA, buf, count * sizeof(*e), NULL, &resp_len);
	kfree(buf);
	return err;
}

int ipnc_get_fw_stats(struct ipnc_adapter *a, struct ipnc_global_stats *stats)
{
	u32 len = sizeof(*stats);
	int err;

	err = ipnc_admin_cmd(a, IPNC_OPCODE_GET_STATS, NULL, 0, stats, &len);
	if (!err && len != sizeof(*stats))
		err = -EPROTO;
	return err;
}
